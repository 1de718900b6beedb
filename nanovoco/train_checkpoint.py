"""Training checkpoints: the model's weights as safetensors in LLaVA's layout (from_pretrained loads them), with its
tokenizer and system prompt; the optimizer state as a sharded DCP checkpoint; the step and the options in state.json.
Written to checkpoint.tmp and renamed, so an interruption at any moment leaves the previous checkpoint whole."""
import json
import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from nanovoco import formats
from nanovoco.parallel import barrier


def save_checkpoint(out: Path, vlm, optim, step: int, config: dict, tokenizer, system_prompt: str, rank: int):
    """Save the run's state after `step` steps (config: the run's options, kept in state.json for check_resumable)."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # a run that died between the renames of the last save left both: keep the newer
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    full = get_model_state_dict(vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        formats.save_vlm(tmp / "model", vlm.config, full)
        tokenizer.save(tmp / "model")
        # the system prompt the model was trained with, which inference must use too (infer.py reads it)
        (tmp / "model" / "prompt.json").write_text(json.dumps({"system": system_prompt}))
    dcp.save({"optimizer": get_optimizer_state_dict(vlm, optim)}, checkpoint_id=str(tmp / "optimizer"))
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def find_checkpoint(out: Path):
    """The last complete checkpoint: checkpoint/, or checkpoint.old/ if the run died between the two renames."""
    for d in (out / "checkpoint", out / "checkpoint.old"):
        if (d / "state.json").exists():
            return d
    return None


def check_resumable(saved: dict, now: dict, where: Path):
    """An error unless the saved options (state.json's config) are the ones given now, but for those that change
    no number."""
    changed = {k: (v, now.get(k)) for k, v in saved.items()
               if k not in ("resume", "stop_after", "eval_every", "eval_limit", "log_every", "save_every", "out_dir",
                            "micro_batch_size")  # neither changes the numbers: the loss is normalised per batch
               and now.get(k) != v}
    if changed:
        raise ValueError(f"{where}/state.json was trained with other settings {changed} (saved, now): resume with "
                         f"the original options or start a new --out_dir")
