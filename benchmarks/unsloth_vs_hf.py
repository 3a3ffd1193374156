"""Benchmark: LoRA training throughput and peak memory of the Unsloth path against transformers + PEFT (with
bitsandbytes for 4-bit), on the same model, the same batches and the same LoRA settings, both loaded by
qlora_finetune.py's own code.  Each backend runs in its own process (Unsloth patches transformers when imported);
the first steps (compilation, warm-up) are left out of the timing.  `--child` trains with the backend of the process
it runs in: scripts/gpu_check.py runs it so in the processes where each backend is already imported, and puts the two
results together with `report`.

    python benchmarks/unsloth_vs_hf.py --model_path MODEL [--steps 12] [--batch_size 4] [--words 400] [--load_in_4bit auto]
                                      [--json results.json]

Each backend's line says how llm.load_base really loaded the model (its backend, 4-bit or not, device).
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("guitar string sound tone pedal amp cable tuner strap pick capo bass drum mic stand case quality price "
         "cheap solid great good bad noisy clear warm bright heavy light durable works fine broke love value").split()


def child(args) -> dict:
    """Train `args.steps` steps with this process's backend (llm.backend(): REASON4REC_BACKEND, else Unsloth where
    installed); its results.  Peak GPU memory is counted from what was allocated when it began, so that it is the
    training's own in a process that ran other work before."""
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import llm
    import qlora_finetune as qf
    import training

    baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    rng = random.Random(0)
    examples = [{"prompt": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(args.words))}],
                 "completion": [{"role": "assistant", "content": f"Predicted Rating: {rng.randint(1, 5)}.0"}]}
                for _ in range(args.steps * args.batch_size)]
    finetune = qf.FinetuneArguments(model_path=args.model_path, load_in_4bit=args.load_in_4bit, max_len=4096)
    config = SFTConfig(output_dir=str(Path(args.out) / "trainer"), max_steps=args.steps, logging_steps=1,
                       per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, save_strategy="no",
                       report_to="none", learning_rate=1e-4, seed=42, max_length=4096, **training.hardware_defaults())
    model, tokenizer, lora = qf.load_for_training(finetune, config)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    dataset = Dataset.from_list(examples)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                         callbacks=[Clock()])
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"]) / len(trainer.train_dataset)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    steady = times[2:] or times
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    loaded = llm.LOADS[-1]  # as load_base reports it
    return {"backend": llm.backend(), "loaded_backend": loaded["backend"], "in_4bit": loaded["in_4bit"],
            "device": loaded["device"], "first_step_s": times[0], "steady_step_s": sum(steady) / len(steady),
            "sequences_per_step": per_step, "tokens_per_sequence": tokens, "peak_memory_gib": peak,
            "memory_kind": "GPU (max allocated)" if torch.cuda.is_available() else "CPU (peak RSS of the process)"}


def report(settings: dict, results: dict, failed: dict) -> dict:
    """Both backends' results and, where both ran, Unsloth's over transformers': sequences per second, peak memory."""
    ratios = None
    if len(results) == 2:
        u, h = results["unsloth"], results["hf"]
        ratios = {"sequences_per_s": (u["sequences_per_step"] / u["steady_step_s"])
                  / (h["sequences_per_step"] / h["steady_step_s"]),
                  "peak_memory": u["peak_memory_gib"] / h["peak_memory_gib"]}
    return {"settings": settings, "results": results, "failed": failed, "unsloth_over_hf": ratios}


def table(report: dict) -> str:
    s = report["settings"]
    lines = [f"{s['model_path']}, {s['steps']} steps of {s['batch_size']} sequences, 4-bit: {s['load_in_4bit']}",
             "| backend | loaded as | first step (s) | steady step (s) | sequences/s | tokens/s | peak memory (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        seq = r["sequences_per_step"] / r["steady_step_s"]
        loaded = f"{r['loaded_backend']}, {'4-bit' if r['in_4bit'] else 'not 4-bit'}, {r['device']}"
        lines.append(f"| {name} | {loaded} | {r['first_step_s']:.2f} | {r['steady_step_s']:.3f} | {seq:.2f} | "
                     f"{seq * r['tokens_per_sequence']:.0f} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) |")
    ratios = report["unsloth_over_hf"]
    if ratios:
        lines.append(f"\nUnsloth / HF: {ratios['sequences_per_s']:.2f}x the sequences per second, "
                     f"{ratios['peak_memory']:.2f}x the peak memory")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--words", type=int, default=400, help="words per prompt")
    parser.add_argument("--load_in_4bit", default="auto")
    parser.add_argument("--out", default="benchmark_out")
    parser.add_argument("--json", help="also write the results (per backend, and the ratios) to this JSON file")
    parser.add_argument("--child", action="store_true", help="train with this process's backend only; print (and "
                        "with --json write) its results")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("child", "json")}


def main():
    args = parse()
    if args.child:
        result = child(args)
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return

    settings = settings_of(args)
    results, failed = {}, {}
    for backend in ("unsloth", "hf"):
        env = {**os.environ, "REASON4REC_BACKEND": backend}
        start = time.time()
        done = subprocess.run([sys.executable, __file__, "--child", *(f"--{k}={v}" for k, v in settings.items())],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{backend}: failed\n{done.stderr[-3000:]}")
            failed[backend] = {"start": start, "end": time.time(), "error": done.stderr[-3000:]}
            continue
        results[backend] = {**json.loads(done.stdout.strip().splitlines()[-1]), "start": start, "end": time.time()}

    result = report(settings, results, failed)
    print("\n" + table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
