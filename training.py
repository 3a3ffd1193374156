"""What the trainers share (qlora_finetune.py for the four SFT experts, 4_GRPO/1 for the GRPO Reasoner): the paper's
precision and optimizer, the global batch across processes, what makes two runs the same job (resume it, or refuse),
and the end of a run: the candidate checkpoints scored on the validation rows, the best one (or the last state)
exported as <output>/final_checkpoint with its selection.json, training log and provenance.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback
from trl import GRPOConfig, TrlParser

import llm
import parallel
from cache import ResultCache
from prompts import RATING_PREFIX
from settings import DataArguments, checked_args
from utils import damage, fail, read_json, read_pickle, sha256, write_json


def parse(dataclass_types, argv=None, **defaults):
    """A trainer's arguments: DataArguments first, then `dataclass_types` (the last one TRL's config), from a YAML file
    (--config, TRL's parser), then the command line; the recorded prompt settings resolved (utils.recorded)."""
    parser = TrlParser((DataArguments, *dataclass_types))
    parser.set_defaults(**hardware_defaults(), seed=42, report_to="none", logging_steps=1,
                        output_dir=os.environ.get("OUTPUT_DIR", ""), **defaults)
    return checked_args(parser.parse_args_and_config(argv, return_remaining_strings=True))


def hardware_defaults() -> dict:
    """The paper's precision and optimizer where there is a GPU; what a CPU can run elsewhere."""
    if torch.cuda.is_available():
        return dict(bf16=torch.cuda.is_bf16_supported(), fp16=not torch.cuda.is_bf16_supported(), optim="adamw_8bit")
    return dict(bf16=False, fp16=False, optim="adamw_torch")


def keep_global_batch(config, exact: bool = True):
    """The configured batch (per-device batch x gradient accumulation, the official values for one GPU) is the global
    batch: with N processes each takes 1/N of it, by dividing the per-device batch or else the accumulation."""
    n, per_device, accumulation = parallel.world_size(), config.per_device_train_batch_size, \
        config.gradient_accumulation_steps
    if n == 1:
        return
    if per_device % n == 0:
        config.per_device_train_batch_size = per_device // n
    elif accumulation % n == 0:
        config.gradient_accumulation_steps = accumulation // n
    elif exact:
        fail(f"the global batch {per_device} x {accumulation} cannot be split over {n} processes; pass "
             f"--per_device_train_batch_size / --gradient_accumulation_steps that can, or --exact_global_batch false "
             f"to train with {per_device * accumulation * n} per step")


@dataclass
class GRPOArguments(GRPOConfig):
    """GRPOConfig's settings as parsed, not yet built: GRPOConfig derives its generation schedule (generation_batch_size,
    steps_per_generation) from the batch when it is built, so `grpo_batch` builds it once the batch is final."""

    def __post_init__(self):
        pass


def grpo_batch(parsed: GRPOArguments, prompts_per_step: int):
    """GRPO's batch, set by the prompts per optimizer step (each sampled num_generations times): their completions are
    shared evenly by the processes, each taking at most its per-device batch per forward pass and accumulating the
    rest.  Returns the GRPOConfig built with that batch, so that every optimizer step generates once, for its own
    prompts; a generation schedule given by hand, or derived otherwise, is refused."""
    n, completions = parallel.world_size(), prompts_per_step * parsed.num_generations
    if parsed.generation_batch_size is not None or parsed.steps_per_generation is not None:
        fail("--generation_batch_size and --steps_per_generation are derived here from --prompts_per_step (every "
             "optimizer step generates for its own prompts); leave them out")
    if prompts_per_step < 1 or completions % n:
        fail(f"--prompts_per_step {prompts_per_step} x --num_generations {parsed.num_generations} = {completions} "
             f"completions per optimizer step cannot be shared evenly by {n} processes")
    per_process = completions // n
    per_device = min(parsed.per_device_train_batch_size, per_process)
    if per_process % per_device:
        fail(f"each of the {n} processes computes {per_process} completions per optimizer step, which "
             f"--per_device_train_batch_size {per_device} does not divide; pass one that does")
    accumulation = per_process // per_device
    if parsed.gradient_accumulation_steps not in (1, accumulation):
        fail(f"--gradient_accumulation_steps is derived here from --prompts_per_step ({accumulation} with these "
             f"settings), not {parsed.gradient_accumulation_steps}; leave it out")
    settings = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
    config = GRPOConfig(**{**settings, "per_device_train_batch_size": per_device,
                           "gradient_accumulation_steps": accumulation,
                           # on a CPU, transformers makes NUM_GPUS gloo processes one group only with use_cpu
                           "use_cpu": settings["use_cpu"] or not torch.cuda.is_available()})
    if (config.generation_batch_size, config.per_device_train_batch_size * config.steps_per_generation * n) != \
            (completions, completions):
        fail(f"the trainer derived a generation batch of {config.generation_batch_size} completions "
             f"({config.per_device_train_batch_size} per device x {config.steps_per_generation} steps x {n} processes) "
             f"instead of the {completions} of one optimizer step")
    return config


def global_batch(config) -> int:
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * parallel.world_size()


# ---------------------------------------------------------------------------------------------- same job, or not
# The settings of TRL's config (transformers' TrainingArguments) that change the trained weights, for every trainer.
TRAINING_SETTINGS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
                     "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16",
                     "seed", "data_seed", "num_train_epochs", "max_steps")


def job_settings(names, config, *settings: dict) -> dict:
    """What defines a training job (see resumable_checkpoint): TRAINING_SETTINGS and `names`, read from `settings`
    (later ones win) over `config`, with what every trainer shares: the backend, the dtype and the global batch."""
    known = {**config.to_dict(), "backend": llm.backend(), "dtype": str(llm.default_dtype()),
             "global_batch": global_batch(config)}
    for more in settings:
        known.update(more)
    return {name: known[name] for name in ("backend", "dtype", "global_batch", *TRAINING_SETTINGS, *names)}


def made_from(job: dict, inputs, **choice) -> dict:
    """What a final_checkpoint is made from: the job, its input files (by name and sha256) and how it is chosen
    (`choice`); recorded in its provenance.json, so that a rerun can tell there is nothing left to do (`finished`)."""
    made = {"job": job, "inputs": {Path(p).name: sha256(p) for p in inputs}, "choice": choice}
    return json.loads(json.dumps(made, default=str))  # as it reads back from provenance.json


def finished(output: Path, made: dict) -> bool:
    """Whether <output>/final_checkpoint is already what this run would make (`made`, see made_from): a rerun of a
    finished job then changes nothing (transformers, resumed from its last checkpoint, would train a step more)."""
    try:
        done = read_json(output / "final_checkpoint" / "provenance.json")["settings"]["made_from"] == made
    except (SystemExit, KeyError, TypeError):  # none yet, or not one of this project's
        return False
    if done:
        print(f"{output / 'final_checkpoint'} is this job's, made from these inputs and chosen the same way: "
              f"nothing left to do")
    return done


def resumable_checkpoint(output: Path, job: dict):
    """The last complete checkpoint of an interrupted run of this very job (`job`: the settings that define it), else
    None.  The work of another job in the folder (its checkpoints, its final_checkpoint) stops the run: it is the
    user's, and never deleted.  A checkpoint cut short (see `_cut_short`) is skipped."""
    checkpoints = sorted(output.glob("checkpoint-*"), key=_step)
    record = output / "job.json"
    if checkpoints or (output / "final_checkpoint").exists():
        earlier = read_json(record) if record.exists() else None
        if earlier != job:
            differing = "unknown: it has no job.json" if earlier is None else ", ".join(
                f"{k} {earlier.get(k)!r} -> {job.get(k)!r}" for k in {**earlier, **job} if earlier.get(k) != job.get(k))
            held = "checkpoints" if checkpoints else "a final_checkpoint"
            fail(f"{output} holds {held} of another training job (what differs: {differing}). Nothing was deleted. "
                 f"To resume or redo that job, rerun it with its own settings; to train this one, give it another "
                 f"folder (OUTPUT_DIR=... or --output_dir ...), or move {output} away.")
    complete = []
    for c in checkpoints:
        cause = _cut_short(c)
        if cause:
            print(f"skipping {c}: it was cut short ({cause})")
        else:
            complete.append(c)
    if complete:
        print(f"resuming from {complete[-1]}")
        return str(complete[-1])
    write_json(job, record)
    return None


def train(trainer, resume: str | None):
    """trainer.train(resume_from_checkpoint=resume), but from a checkpoint that already holds every step: there
    transformers' loop would take one step more (it checks max_steps after a step), so the checkpoint's state is the
    final state.  Returns the final state's adapter: the trained model, or that checkpoint's folder."""
    if resume is not None and trainer.args.max_steps > 0:
        from transformers import TrainerState

        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if state.global_step >= trainer.args.max_steps:
            print(f"{resume} holds all {trainer.args.max_steps} steps: nothing left to train")
            trainer.state = state
            return Path(resume)
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model


def complete_checkpoints(output: Path) -> list[Path]:
    return [c for c in sorted(output.glob("checkpoint-*"), key=_step) if not _cut_short(c)]


def _cut_short(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: transformers writes trainer_state.json last, so a kill while
    it saves leaves none; a power loss may leave it written but its weights or optimizer state short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    for f in sorted(checkpoint.iterdir()):
        if f.is_file() and (cause := damage(f)):
            return f"{f.name}: {cause}"
    return None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


class ShowBatch(TrainerCallback):
    """Print what the trainer really uses (Unsloth may change the accumulation by itself)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"training: global batch {args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size}"
                  f" = {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation"
                  f" x {args.world_size} processes; {state.max_steps} steps", flush=True)


# ---------------------------------------------------------------------------------------------- choosing, saving
def rating_mae(data: DataArguments, valid_file: Path, *, load_in_4bit="auto", batch_size: int = 8):
    """The validation metric of a rating expert (reward model, Predictor, Direct Predictor): the MAE of its
    logits-weighted rating on the examples of `valid_file` (SFT format, answers "Predicted Rating: x").  Returns
    (metric, description): `metric(adapter_folder)` loads the adapter as inference does and scores every example."""
    examples = read_pickle(valid_file, what="messages")
    questions = [x["messages"][0]["content"] for x in examples]
    try:
        truth = np.array([float(x["messages"][-1]["content"].removeprefix(RATING_PREFIX)) for x in examples])
    except ValueError:
        fail(f"{valid_file} holds answers that are not ratings ({RATING_PREFIX}x)")
    cache = ResultCache(data.file("generation_cache.sqlite")) if data.dataset else None

    def metric(folder: Path) -> float:
        expert = llm.load_model(folder, load_in_4bit=load_in_4bit, cache=cache, batch_size=batch_size)
        return float(np.abs(expert.score(questions, desc=f"validation, {folder.name}") - truth).mean())

    return metric, f"MAE of the rating after '{RATING_PREFIX}' on {valid_file} ({len(examples):,} rows)"


def export(source, folder: Path, save_lm_head: bool = True):
    """The adapter of a checkpoint folder (or of a model, `source`) as it is saved: PEFT's files, target_modules sorted
    (PEFT writes them in set order) and, with `save_lm_head` false, without the trained lm_head (the official trainer's
    adapters)."""
    shutil.rmtree(folder, ignore_errors=True)
    if isinstance(source, Path):
        folder.mkdir(parents=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(source / name, folder / name)
    else:  # the trained adapter alone (GRPO's model also holds TRL's frozen "ref" copy of it)
        source.save_pretrained(folder, selected_adapters=[source.active_adapter])
    config_file = folder / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text())
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    if not save_lm_head and adapter_config.get("modules_to_save"):
        from safetensors.torch import load_file, save_file

        weights = folder / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if "lm_head" not in k}, weights, metadata={"format": "pt"})
        adapter_config["modules_to_save"] = None
    write_json(adapter_config, config_file)


def replace_atomically(final: Path, folder: Path):
    """Put `folder` in the place of `final` in one atomic step, so that a kill at any moment leaves the old `final` or
    the new one, never neither: `final` is a symbolic link to a hidden folder beside it (the first free name of
    .<name>.1, .<name>.2, ...), replaced by a rename (atomic in POSIX).  The folders beside it that it no longer names
    are then deleted (also those of an interrupted run).  A `final` that is a plain folder (copied without its link)
    is moved aside first, the one moment it is missing."""
    target = next(v for v in (final.with_name(f".{final.name}.{n}") for n in count(1)) if not v.exists())
    folder.replace(target)
    link = final.with_name(f".{final.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)  # relative: the output folder can be moved or copied
    if final.is_dir() and not final.is_symlink():
        aside = final.with_name(f".{final.name}.plain")
        shutil.rmtree(aside, ignore_errors=True)
        final.replace(aside)
    os.replace(link, final)
    for old in final.parent.glob(f".{final.name}.*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def finish(trainer, final, tokenizer, output: Path, record: dict, *, metric=None, metric_name: str | None = None,
           select_on_valid: bool = True, save_lm_head: bool = True, start: Path | None = None):
    """Choose and save the adapter: <output>/final_checkpoint, with selection.json (every candidate and its validation
    metric, and the one chosen), log_history.json and provenance.json (`record`); an earlier final_checkpoint is
    replaced atomically (see replace_atomically).

    The candidates are the run's checkpoints and its final state (`final`: what `train` returned), and `start`, the
    adapter that training started from (GRPO's SFT Reasoner), as step 0: training must beat it to be kept.  With a
    `metric` (lower is better) each is scored on the validation rows and, with `select_on_valid`, the best is kept
    (the earliest of equals); otherwise the final state is kept, as the official code does."""
    staging = output / ".final_checkpoint.tmp"
    final_step = trainer.state.global_step
    sources = {}  # name: (adapter folder or model, step)
    if metric and start is not None:
        sources["start"] = (start, 0)
    if metric:
        sources.update((c.name, (c, _step(c))) for c in complete_checkpoints(output) if _step(c) < final_step)
    sources["final state"] = (final, final_step)
    if parallel.is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        for name, (source, _) in sources.items():
            export(source, staging / name.replace(" ", "_"), save_lm_head)
    parallel.barrier()
    candidates = [{"candidate": name, "step": step,
                   "valid_metric": metric(staging / name.replace(" ", "_")) if metric else None}
                  for name, (_, step) in sources.items()]
    chosen = min(candidates, key=lambda c: c["valid_metric"]) if metric and select_on_valid else candidates[-1]
    selection = {"expert": output.name, "metric": metric_name, "select_on_valid": select_on_valid,
                 "candidates": candidates, "chosen": chosen["candidate"], "chosen_step": chosen["step"],
                 "why": ("the lowest validation metric" if metric and select_on_valid else
                         "--select_on_valid false: the final state, as the official code" if not select_on_valid else
                         "no validation metric for this expert: the final state, as the official code")}
    if parallel.is_main_process():
        folder = staging / chosen["candidate"].replace(" ", "_")
        tokenizer.save_pretrained(folder)
        write_json(trainer.state.log_history, folder / "log_history.json")
        write_json(selection, folder / "selection.json")
        write_json(record, folder / "provenance.json")
        write_json(selection, output / "selection.json")
        final = output / "final_checkpoint"
        replace_atomically(final, folder)
        print(f"kept {chosen['candidate']} (step {chosen['step']}; {selection['why']}) as {final}")
        for c in candidates:
            if c["valid_metric"] is not None:
                print(f"  {c['candidate']:<16} step {c['step']:>6}  validation {c['valid_metric']:.4f}")
    parallel.barrier()
    return selection
