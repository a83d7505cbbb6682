"""LoRA contrastive training (``sfr-export finetune --config FILE``).

LoRA through ``peft`` on the configured target modules; gradient checkpointing; bf16 autocast where available;
gradient accumulation; linear warmup then linear decay; checkpoints every ``save_every`` steps that resume exactly
(trainable weights, optimizer, scheduler, sampler cursors, RNG) and refuse a checkpoint made from another model;
rich progress with loss and throughput. Output dir::

    adapter/            the LoRA adapter (peft format)
    merged/             base + adapter merged, safetensors, with the base's spec files (``sfr-export build --model``)
    checkpoints/step-N/ resumable state
    finetune.json       what was trained, how, figures, and sha256 of every output file
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._optional import require
from ..errors import TrainingError
from ..artifact import atomic_dir
from .config import FinetuneConfig
from .data import Example, read_jsonl, tasks_of
from .distributed import DistInfo, all_reduce_mean, barrier, full_params, init_from_env, wrap_model
from .sampler import TaskBatchSampler
from .step import EmbeddingModel, Tokenizers, collate, contrastive_step

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIM_TENSORS = "optimizer.safetensors"  # no pickles: tensors here, the rest in JSON
OPTIM_META = "optimizer.json"
RECORD_FILE = "finetune.json"


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run in this call
    seconds: float = 0.0
    examples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    adapter_dir: Path | None = None
    merged_dir: Path | None = None


def load_examples(cfg: FinetuneConfig) -> list[Example]:
    if not cfg.data.train:
        raise TrainingError("data.train lists no JSONL files")
    examples: list[Example] = []
    for path in cfg.data.train:
        loaded = read_jsonl(path, on_bad_line=cfg.data.on_bad_line)
        if loaded.skipped:
            log.warning("%s: skipped %d bad line(s): %s", path, len(loaded.skipped),
                        ", ".join(str(n) for n, _ in loaded.skipped[:20]))
        examples.extend(loaded.examples)
    tasks_of(examples)  # one type per task across files
    return examples


def use_bf16(setting: str, device: str) -> bool:
    if setting == "off":
        return False
    if setting == "on":
        return True
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_lora_model(model_dir: Path, cfg: FinetuneConfig, device: str) -> Any:
    """The backbone with LoRA adapters; only the adapters train."""
    peft = require("peft", purpose="LoRA fine-tuning")
    from ..models import load_backbone

    backbone = load_backbone(model_dir, dtype=cfg.model.dtype, device=device)
    targets: str | list[str] = "all-linear" if list(cfg.lora.target_modules) == ["all-linear"] else list(cfg.lora.target_modules)
    lcfg = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=targets, bias="none")
    torch.manual_seed(cfg.train.seed)
    try:
        model = peft.get_peft_model(backbone, lcfg)
    except ValueError as exc:
        raise TrainingError(f"LoRA could not wrap the model: {exc}") from exc
    if cfg.train.gradient_checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _identity(cfg: FinetuneConfig, fingerprint: str) -> dict[str, Any]:
    return {"base_fingerprint": fingerprint, "lora": cfg.to_dict()["lora"], "model_dtype": cfg.model.dtype}


def latest_checkpoint(output: Path) -> Path | None:
    ckpts = sorted((output / "checkpoints").glob("step-*/" + STATE_FILE))
    return ckpts[-1].parent if ckpts else None


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output: Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    sampler: TaskBatchSampler, identity: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file

    final = output / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        _save_optimizer(optimizer, scheduler, tmp)
        state = {"step": step, "sampler": sampler.state_dict(), "identity": identity,
                 "python_rng": list(random.getstate()[1]), "torch_rng": torch.get_rng_state().tolist()}
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    for old in sorted((output / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, sampler: TaskBatchSampler,
                    identity: dict[str, Any]) -> int:
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
    theirs = state.get("identity", {})
    if theirs.get("base_fingerprint") != identity["base_fingerprint"]:
        raise TrainingError(f"checkpoint {ckpt} was made from another model (fingerprint "
                            f"{str(theirs.get('base_fingerprint'))[:12]}…, this base is {identity['base_fingerprint'][:12]}…); "
                            "use another train.output or set train.resume = false")
    if theirs != identity:
        raise TrainingError(f"checkpoint {ckpt} was made with other LoRA/dtype settings: {theirs} vs {identity}")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or set(weights) - set(params):
        raise TrainingError(f"checkpoint {ckpt} does not match the model's trainable parameters ({missing[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    _load_optimizer(optimizer, scheduler, ckpt)
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"])


def _save_optimizer(optimizer: Any, scheduler: Any, out: Path) -> None:
    """Optimizer tensors to safetensors, everything else (param groups, scalars, scheduler) to JSON: no pickle."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        scalars[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[str(pid)][k] = v
    save_file(tensors, str(out / OPTIM_TENSORS))
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "scheduler": scheduler.state_dict()}
    (out / OPTIM_META).write_text(json.dumps(meta), encoding="utf-8")


def _load_optimizer(optimizer: Any, scheduler: Any, ckpt: Path) -> None:
    from safetensors.torch import load_file

    if not (ckpt / OPTIM_TENSORS).is_file() or not (ckpt / OPTIM_META).is_file():
        raise TrainingError(f"checkpoint {ckpt} has no {OPTIM_TENSORS}/{OPTIM_META} (made by an older sfr-export?): "
                            "set train.resume = false to start over")
    meta = json.loads((ckpt / OPTIM_META).read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["scalars"].items()}
    for key, t in load_file(str(ckpt / OPTIM_TENSORS)).items():
        pid, _, name = key.partition("/")
        state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])


# ---- the loop ------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]finetune[/]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  {task.fields[eps]:.2f} ex/s  {task.fields[tps]:.0f} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


@dataclass
class _Job:
    """Everything one training run holds: data, model, optimizer, and the counters of the loop."""

    cfg: FinetuneConfig
    info: DistInfo
    resolved: Any
    examples: list[Example]
    sampler: TaskBatchSampler
    peft_model: Any
    model: Any
    toks: Any
    params: list[Any]
    optimizer: Any
    scheduler: Any
    identity: dict[str, Any]
    examples_seen: int = 0
    tokens_seen: int = 0


def train(cfg: FinetuneConfig, *, info: DistInfo | None = None) -> TrainResult:
    """Run (or resume) a fine-tuning job described by ``cfg``; write the adapter, the merged model and a record."""
    from .output import write_outputs

    info = info or init_from_env()
    t_start = time.time()
    job = _setup(cfg, info)
    step = _resume(job)
    result = TrainResult(output=Path(cfg.train.output), steps=step, resumed_from=step or None)
    t_loop = time.time()
    with _progress(cfg.train.steps, info.is_main) as prog:
        bar = prog.add_task("train", total=cfg.train.steps, completed=step, loss=float("nan"), eps=0.0, tps=0.0)
        while step < cfg.train.steps:
            step += 1
            result.losses.append(_train_step(job, step))
            elapsed = max(time.time() - t_loop, 1e-9)
            prog.update(bar, completed=step, loss=result.losses[-1], eps=job.examples_seen / elapsed,
                        tps=job.tokens_seen / elapsed)
            _log_and_checkpoint(job, step, result.losses[-1], elapsed)
    result.steps = step
    elapsed = max(time.time() - t_loop, 1e-9)
    result.examples_per_s, result.tokens_per_s = job.examples_seen / elapsed, job.tokens_seen / elapsed
    with full_params(job.model):
        if info.is_main:
            _save(job, step)
            result.seconds = time.time() - t_start
            write_outputs(result.output, job.peft_model, job.resolved, cfg, result)
    barrier(info)
    return result


def _setup(cfg: FinetuneConfig, info: DistInfo) -> _Job:
    from ..models import load_tokenizer
    from ..models.loading import resolve_model

    resolved = resolve_model(cfg.model.base, revision=cfg.model.revision or None)
    examples = load_examples(cfg)
    sampler = TaskBatchSampler(tasks_of(examples), cfg.sampler.batch_size, weights=cfg.sampler.weights,
                               seed=cfg.sampler.seed, homogeneous=cfg.sampler.homogeneous)
    if cfg.sampler.batch_size % info.world:
        raise TrainingError(f"sampler.batch_size {cfg.sampler.batch_size} is not a multiple of the {info.world} processes")
    random.seed(cfg.train.seed)
    peft_model = build_lora_model(resolved.local_dir, cfg, info.device)
    toks = Tokenizers.make(load_tokenizer(resolved.local_dir), resolved.spec, cfg.data.max_query_length,
                           cfg.data.max_doc_length)
    model = wrap_model(EmbeddingModel(peft_model, resolved.spec), info, fsdp=cfg.train.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps))
    return _Job(cfg, info, resolved, examples, sampler, peft_model, model, toks, params, optimizer, scheduler,
                _identity(cfg, resolved.fingerprint))


def _resume(job: _Job) -> int:
    """The step to start from: the latest checkpoint's when ``train.resume``, else 0."""
    cfg = job.cfg
    ckpt = latest_checkpoint(Path(cfg.train.output)) if cfg.train.resume else None
    if ckpt is None:
        return 0
    if cfg.train.fsdp and job.info.enabled:
        raise TrainingError(f"resuming under FSDP is not supported (optimizer state is sharded): {ckpt} exists; "
                            "use DDP to resume, or set train.resume = false")
    step = load_checkpoint(ckpt, job.peft_model, job.optimizer, job.scheduler, job.sampler, job.identity)
    log.info("resumed from %s (step %d)", ckpt, step)
    return step


def _train_step(job: _Job, step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the loss averaged over processes."""
    cfg, info = job.cfg, job.info
    job.optimizer.zero_grad(set_to_none=True)
    autocast = use_bf16(cfg.train.bf16, info.device)
    step_loss = 0.0
    for micro in range(cfg.train.grad_accum):
        sampled = job.sampler.next_batch()
        batch = collate(job.examples, sampled.indices, spec=job.resolved.spec, loss=cfg.loss, step=sampled.step,
                        seed=cfg.sampler.seed)
        res = contrastive_step(job.model, batch, job.toks, cfg.loss, info, scale=1.0 / cfg.train.grad_accum,
                               sync=micro == cfg.train.grad_accum - 1, autocast=autocast)
        step_loss += res.loss / cfg.train.grad_accum
        job.examples_seen += len(sampled.indices)
        job.tokens_seen += res.tokens * info.world
    if cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(job.params, cfg.train.max_grad_norm)
    job.optimizer.step()
    job.scheduler.step()
    step_loss = all_reduce_mean(step_loss, info)
    if not step_loss == step_loss or step_loss == float("inf"):
        raise TrainingError(f"loss became {step_loss} at step {step}: lower train.learning_rate or check the data")
    return step_loss


def _log_and_checkpoint(job: _Job, step: int, loss: float, elapsed: float) -> None:
    cfg, info = job.cfg, job.info
    if info.is_main and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
        log.info("step %d/%d loss %.4f lr %.2e %.2f ex/s %.0f tok/s", step, cfg.train.steps, loss,
                 job.scheduler.get_last_lr()[0], job.examples_seen / elapsed, job.tokens_seen / elapsed)
    if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
        with full_params(job.model):
            if info.is_main:
                _save(job, step)
        barrier(info)


def _save(job: _Job, step: int) -> None:
    save_checkpoint(Path(job.cfg.train.output), step, job.peft_model, job.optimizer, job.scheduler, job.sampler,
                    job.identity, job.cfg.train.keep_checkpoints)
