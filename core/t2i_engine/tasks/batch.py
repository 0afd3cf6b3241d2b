"""``sample`` over a prompt file of any length: sharded across Fabric ranks, resumable, with a manifest.

``[task] prompt_file`` names a file of prompts (path or fsspec URL), read as a stream:

* ``.jsonl``: one JSON object per line, the prompt under ``prompt_column`` (or a bare JSON string);
* ``.csv``: a header row, the prompt in the ``prompt_column`` column;
* anything else: one prompt per line (blank lines are skipped).

Prompt ``i`` (counted from 0 over the prompts, not the lines) gives ``images_per_prompt`` images
``j``, item ``k = i * images_per_prompt + j``, seed ``engine.seed + k`` (as plain ``sample``), written
as ``{i:06d}-{seed}.png``. The items are cut into batches of ``batch_size`` in order and batch
``b`` goes to rank ``b % world_size``: a batch holds the same images whatever the number of
ranks, so the files and their pixels do not depend on it. A batch whose files all exist is skipped
(the PNGs are written atomically, so an existing file is a whole one): a restarted job finishes
what is missing. At the end rank 0 writes ``manifest`` (JSONL, in ``output_dir``): one line per
image of the file that exists, in order, ``{"index", "image", "seed", "prompt", "file"}``.

Ranks come from Lightning Fabric (``devices`` per node, ``num_nodes``; ``ddp``, gloo on the CPU):
a single node's processes are launched by Fabric itself, several nodes by torchrun or SLURM.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_engine.errors import ConfigError
from t2i_engine.interfaces import RunContext

__all__ = ["Item", "batches", "image_name", "items", "read_prompts", "run_batch", "write_manifest"]


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of the prompt file: prompt ``index``, its ``image`` number, its seed and prompt."""

    index: int
    image: int
    seed: int
    prompt: str

    @property
    def file(self) -> str:
        return image_name(self.index, self.seed)


def image_name(index: int, seed: int) -> str:
    """The file of prompt ``index``'s image with ``seed``."""
    return f"{index:06d}-{seed}.png"


def _jsonl(lines: Iterator[str], column: str) -> Iterator[str]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"task.prompt_file: line {lineno}: not valid JSON ({exc})") from None
        prompt = row if isinstance(row, str) else row.get(column) if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise ConfigError(f"task.prompt_file: line {lineno}: expected an object with a string '{column}' "
                              f"(task.prompt_column) or a JSON string, got {line.strip()[:80]!r}")
        yield prompt


def _csv(lines: Iterator[str], column: str) -> Iterator[str]:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise ConfigError(f"task.prompt_column: the CSV has no column '{column}'; its columns: "
                          f"{', '.join(reader.fieldnames or []) or 'none'}")
    for row in reader:
        prompt = row[column]
        if prompt is None:
            raise ConfigError(f"task.prompt_file: line {reader.line_num}: no value in column '{column}'")
        yield prompt


def read_prompts(url: str, *, column: str = "prompt") -> Iterator[str]:
    """The prompts of ``url`` in order, streamed (see the module docstring for the formats)."""
    import fsspec

    name = url.split("?")[0].lower()
    try:
        with fsspec.open(url, "rt", encoding="utf-8", newline="") as f:
            lines: Iterator[str] = iter(f)
            if name.endswith(".jsonl"):
                yield from _jsonl(lines, column)
            elif name.endswith(".csv"):
                yield from _csv(lines, column)
            else:
                yield from (line.rstrip("\r\n") for line in lines if line.strip())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"task.prompt_file: '{url}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def items(url: str, *, column: str, images_per_prompt: int, seed: int) -> Iterator[Item]:
    """Every image of the prompt file, in order, with its seed (``seed`` + item number)."""
    for i, prompt in enumerate(read_prompts(url, column=column)):
        for j in range(images_per_prompt):
            yield Item(i, j, seed + i * images_per_prompt + j, prompt)


def batches(stream: Iterator[Item], *, batch_size: int, rank: int, world: int) -> Iterator[list[Item]]:
    """Batch ``b`` of ``batch_size`` consecutive items when ``b % world == rank``."""
    batch: list[Item] = []
    b = 0
    for item in stream:
        batch.append(item)
        if len(batch) == batch_size:
            if b % world == rank:
                yield batch
            batch, b = [], b + 1
    if batch and b % world == rank:
        yield batch


def write_manifest(url: str, out_dir: Path, stream: Iterator[Item]) -> int:
    """Write the JSONL manifest of every item whose file exists in ``out_dir`` (atomically);
    the number of lines."""
    from t2i_engine.checkpoint.io import atomic_write_bytes

    buffer, n = io.StringIO(), 0
    for item in stream:
        if (out_dir / item.file).exists():
            buffer.write(json.dumps(dataclasses.asdict(item) | {"file": item.file}, ensure_ascii=False) + "\n")
            n += 1
    atomic_write_bytes(url, buffer.getvalue().encode("utf-8"))
    return n


def _check(config: Any) -> None:
    if config.prompt_file is None:
        raise ConfigError("task.devices: more than one process shards a prompt file; give task.prompt_file")
    if config.prompts:
        raise ConfigError("task.prompts: give prompts or prompt_file, not both")
    if config.seeds is not None:
        raise ConfigError("task.seeds: not with task.prompt_file (image k of the file has seed engine.seed + k)")


@dataclasses.dataclass
class _OneProcess:
    """What the batch loop uses of Fabric, for one process on the run's own device."""

    device: Any
    global_rank: int = 0
    world_size: int = 1

    def barrier(self) -> None:
        pass


def _fabric(config: Any, ctx: RunContext) -> Any:
    """A launched Fabric (ddp) for several processes; for one, the run's own device (engine.device)."""
    from lightning_fabric import Fabric
    from lightning_fabric.fabric import _is_using_cli

    if config.devices * config.num_nodes == 1:
        return _OneProcess(device=ctx.device)
    accelerator = "cuda" if ctx.device.type == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=config.devices, num_nodes=config.num_nodes, strategy="ddp")
    if not _is_using_cli():
        fabric.launch()  # a single node's other processes re-run this command (a no-op under torchrun)
    return fabric


def run_batch(config: Any, ctx: RunContext) -> Mapping[str, Any]:
    """Run the ``sample`` task ``config`` over its ``prompt_file`` on this rank (see the module docstring)."""
    from tqdm.auto import tqdm

    from t2i_engine.conditioning.build import build_conditioners
    from t2i_engine.diffusion.guidance import GuidanceConfig
    from t2i_engine.pipeline import sampling_sigmas_for
    from t2i_engine.tasks.common import build_model, inference_precision, output_path
    from t2i_engine.tasks.sample import check_output_size, image_metadata, sample_batch, steps_run
    from t2i_engine.utils.images import save_png, to_pil

    _check(config)
    if ctx.config.sampler is None:
        raise ConfigError("sampler: task 'sample' needs a [sampler] table, e.g. name = \"ddim\" and steps = 30")
    fabric = _fabric(config, ctx)
    ctx = dataclasses.replace(ctx, device=fabric.device)
    stream = items(config.prompt_file, column=config.prompt_column, images_per_prompt=config.images_per_prompt,
                   seed=ctx.seed)
    out_dir = Path(ctx.output_dir)
    sampler = ctx.plugins.build(ctx.config.sampler)
    model = build_model(ctx, task="sample")
    check_output_size(model, width=config.width, height=config.height)
    autocast, dtype = inference_precision(ctx, model, compile=config.compile)
    conditioners = build_conditioners(ctx, model, dtype=dtype)
    init = None
    if config.init_image is not None:
        from t2i_engine.conditioning.inputs import load_image

        init = load_image(config.init_image, width=config.width, height=config.height, key="task.init_image").to(dtype)
    sigmas = sampling_sigmas_for(sampler, model.schedule)
    guidance = ctx.config.guidance or GuidanceConfig()
    total = steps_run(sigmas, img2img=init is not None, strength=config.strength)

    def report(info: Mapping[str, Any]) -> None:
        ctx.plugins.hook.on_sample_step(step=int(info["i"]) + 1, total=total, sigma=float(info["sigma"]))

    # the recipe each PNG carries is a one-process sample job of its own batch
    task = ctx.config.task
    single = attrs.evolve(task.options, prompt_file=None, devices=1, num_nodes=1)
    meta_ctx = dataclasses.replace(ctx, config=attrs.evolve(ctx.config, task=attrs.evolve(task, options=single)))
    written = skipped = 0
    mine = batches(stream, batch_size=config.batch_size, rank=fabric.global_rank, world=fabric.world_size)
    for batch in tqdm(mine, desc=f"sample rank {fabric.global_rank}", unit="batch", disable=fabric.global_rank != 0):
        missing = [item for item in batch if not (out_dir / item.file).exists()]
        if not missing:
            skipped += len(batch)
            continue
        prompts, seeds = [i.prompt for i in batch], [i.seed for i in batch]
        images = sample_batch(model, prompts, seeds, config=config, sampler=sampler, sigmas=sigmas, guidance=guidance,
                              device=ctx.device, dtype=dtype, autocast=autocast, init=init,
                              conditioners=conditioners, callback=report)
        for item, pil in zip(batch, to_pil(images)):
            if item not in missing:
                skipped += 1
                continue
            meta = image_metadata(meta_ctx, model, prompt=item.prompt, seed=item.seed, size=pil.size,
                                  steps=len(sigmas) - 1, batch_prompts=prompts, batch_seeds=seeds)
            save_png(pil, str(out_dir / item.file), metadata=meta)  # atomic
            written += 1
    fabric.barrier()
    manifest = output_path(ctx, config.manifest)
    summary: dict[str, Any] = {"written": written, "skipped": skipped, "rank": fabric.global_rank,
                               "world_size": fabric.world_size}
    if fabric.global_rank == 0:
        summary["images"] = write_manifest(manifest, out_dir, items(
            config.prompt_file, column=config.prompt_column, images_per_prompt=config.images_per_prompt, seed=ctx.seed))
        summary["manifest"] = manifest
    fabric.barrier()
    return summary
