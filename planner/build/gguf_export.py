"""A materialized plan for llama.cpp: ``DIR/gguf/model.gguf`` + ``DIR/gguf/adapter.gguf``.

``model.gguf`` is the user's own GGUF of the same model (the *base*: metadata, tokenizer, every
tensor the plan does not target, copied byte for byte in its stored type) with each target tensor
replaced by the plan's GGUF type holding LoftQ's codes (a 16-bit keep as F16/BF16). ``adapter.gguf``
is a LoRA adapter in llama.cpp's format (``llama-adapter.cpp``): ``general.type = adapter``,
``adapter.type = lora``, one ``adapter.lora.alpha`` (float32) for the file, and per target tensor
``<tensor name>.lora_a`` [r, in] and ``<tensor name>.lora_b`` [out, r] (f16 by default, half the
bytes of f32 and what llama.cpp computes LoRA in anyway; f32 on request); llama.cpp scales
each pair by alpha / r with r read from the shapes, so each layer's own alpha is folded into its
``lora_b`` (``lora_b = lora_B * alpha_layer / alpha_file``, ``lora_a = lora_A`` as PEFT stores them).

Llama q/k rows: llama.cpp's converter stores ``attn_q`` / ``attn_k`` rows permuted relative to
Hugging Face (rotary pairs interleaved per head); transformers' GGUF loader undoes it. Our weights
come in Hugging Face order, so the rows of each permuted target tensor and of its ``lora_b`` are
permuted the same way here. GGUF blocks lie along rows, so permuting rows of the encoded data is
exactly encoding the permuted weight: the file decodes to P·deq(Q) and P·B·A.

Both files are written tensor by tensor through the atomic writer (one layer in memory at a time).
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from planner.files.atomic import atomic_write_path
from planner.artifact.layout import GGUF_DIR, PLAN_FILE, peft_key, read_artifact, read_layer
from planner.artifact.plan import Plan
from planner.errors import PlannerError
from planner.options import option

log = logging.getLogger(__name__)

MODEL_GGUF, ADAPTER_GGUF = "model.gguf", "adapter.gguf"
PERMUTED_ARCHS = ("llama",)  # archs whose q/k rows llama.cpp permutes (transformers' LlamaTensorProcessor)
_KEEP_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}
ADAPTER_DTYPES = {"f16": torch.float16, "f32": torch.float32}  # adapter.gguf's lora_a / lora_b storage
DEFAULT_ADAPTER_DTYPE = "f16"
FP16_MAX = 65504.0


def adapter_dtype_option() -> Any:
    """The ``--gguf-adapter-dtype`` setting (materialize --format gguf, finetune): declared once here."""
    return option(DEFAULT_ADAPTER_DTYPE, "dtype of lora_a / lora_b in the llama.cpp adapter.gguf: f16 (half the "
                  "bytes; llama.cpp accepts it; a value beyond +-65504 after alpha folding is refused) or f32",
                  choices=tuple(ADAPTER_DTYPES))


def base_gguf(reference: str) -> Path | None:
    """The GGUF file a model reference stands for: a ``.gguf`` path, or a packaged model shipped as
    one (``smollm2-135m``: its Q4_1 file); None otherwise."""
    path = Path(str(reference)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.resolve()
    from planner.sources.packaged import packaged_gguf

    return packaged_gguf(str(reference).strip().lower())


def gguf_base(plan: Plan, model: str | None) -> Path:
    """The GGUF that ``materialize --format gguf`` copies from, before any work: the model the weights
    are read from (``--model`` or the plan's), so the fingerprint check ties it to the plan."""
    check_gguf_plan(plan)
    ref = model or plan.model["id"]
    path = base_gguf(ref)
    if path is None:
        raise PlannerError(f"--format gguf copies metadata, tokenizer and the other tensors from a GGUF of the model; "
                           f"{ref} is not one: pass --model FILE.gguf (its weights must be the plan's)")
    base = Base(path)
    for layer in plan.layers:  # every target has its tensor there, of its shape
        base.check_shape(base.tensor_name(layer.name), layer.shape)
    return path


def check_gguf_plan(plan: Plan) -> None:
    """Every target must be a GGUF type or a 16-bit keep (codebook codes have no GGUF type)."""
    bad = [layer for layer in plan.layers if layer.spec is not None and layer.spec.ggml_type is None]
    if bad:
        note = getattr(bad[0].spec, "export_note", "")
        raise PlannerError(f"--format gguf needs a plan whose layers are GGUF types (q8_0, q4_k, ...) or 16-bit; "
                           f"{bad[0].name} is {bad[0].quant} ({len(bad)} such layers){'; ' + note if note else ''}")


# ---------------------------------------------------------------- the base file
class Base:
    """A GGUF file opened for copying: its reader, architecture and the facts the export needs."""

    def __init__(self, path: Path) -> None:
        try:
            import gguf
        except ImportError:
            raise PlannerError("--format gguf needs the gguf package: pip install gguf") from None
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as err:  # not a GGUF, truncated: one line
            raise PlannerError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
        self.path = path
        self.arch = self.value(gguf.Keys.General.ARCHITECTURE)
        self.n_blocks = int(self.value(f"{self.arch}.block_count"))
        self.n_head = int(self.value(f"{self.arch}.attention.head_count"))
        kv = self.reader.fields.get(f"{self.arch}.attention.head_count_kv")
        self.n_head_kv = int(kv.contents()) if kv is not None else self.n_head
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        if arch_enum is None:
            raise PlannerError(f"{path}: architecture {self.arch!r} is unknown to the gguf package")
        self.names = gguf.get_tensor_name_map(arch_enum, self.n_blocks)

    def value(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            raise PlannerError(f"{self.path}: no metadata key {key}")
        return field.contents()

    def tensor_name(self, layer: str) -> str:
        """llama.cpp's name of a Hugging Face module's weight (``blk.0.attn_q.weight``)."""
        name = self.names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if name is None or name not in self.tensors:
            raise PlannerError(f"{self.path}: no tensor for {layer} (llama.cpp name {name}); is it a GGUF of the "
                               "plan's model?")
        return name

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        got = tuple(int(d) for d in reversed(self.tensors[name].shape))  # GGUF lists dims innermost first
        if got != tuple(shape):
            raise PlannerError(f"{self.path}: {name} has shape {list(got)}, the plan's layer {list(shape)}")

    def permute(self, rows: torch.Tensor, tensor_name: str) -> torch.Tensor:
        """llama.cpp's row order for ``attn_q`` / ``attn_k`` of a permuted arch ([out, ...] -> same shape)."""
        if self.arch not in PERMUTED_ARCHS or not tensor_name.endswith((".attn_q.weight", ".attn_k.weight")):
            return rows
        heads = self.n_head if ".attn_q." in tensor_name else self.n_head_kv
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)

    def writer(self) -> Any:
        import gguf

        return gguf.GGUFWriter(None, self.arch)

    def copy_metadata(self, writer: Any) -> None:
        """Every key/value of the base but the reader's own (GGUF.*) and the architecture the writer adds."""
        import gguf

        for field in self.reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            value, vtype = field.contents(), field.types[0]
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(value)
            if vtype == gguf.GGUFValueType.ARRAY:
                if not len(value):
                    log.warning("%s: empty metadata array %s is not copied (the gguf writer refuses it)",
                                self.path, field.name)
                    continue
                writer.add_key_value(field.name, value, vtype, sub_type=field.types[-1])
            else:
                writer.add_key_value(field.name, value, vtype)


def _write(path: Path, writer: Any, data: list[tuple[str, Any]]) -> Path:
    """Header, metadata, tensor infos, then each tensor's bytes produced in turn, into a temp file
    renamed to ``path``. ``data``: (name, callable -> numpy array) in the infos' order."""

    def write(tmp: Path) -> None:
        writer.open_output_file(tmp)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, make in data:
                writer.write_tensor_data(make())
        finally:
            writer.close()

    return atomic_write_path(path, write)


# ---------------------------------------------------------------- model.gguf
def write_model_gguf(artifact: Path, base: Base, out: Path) -> Path:
    """``out``: the base GGUF with the artifact's target layers in their planned GGUF types."""
    import gguf

    art = read_artifact(artifact)
    targets = {base.tensor_name(meta.name): meta for meta in art.meta.layers}
    for name, meta in targets.items():
        base.check_shape(name, meta.shape)
    writer = base.writer()
    base.copy_metadata(writer)
    data = []
    for t in base.reader.tensors:
        meta = targets.get(t.name)
        if meta is None:  # copied as stored
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
            data.append((t.name, lambda t=t: t.data))
            continue
        if meta.spec is not None:
            qtype = gguf.GGMLQuantizationType(meta.spec.ggml_type)
        else:
            qtype = gguf.GGMLQuantizationType[_KEEP_TYPES[torch.bfloat16 if meta.dtype == "bf16" else torch.float16]]
        row_bytes = meta.nbytes // meta.shape[0]
        writer.add_tensor_info(t.name, (meta.shape[0], row_bytes), np.dtype(np.uint8), meta.nbytes, raw_dtype=qtype)
        data.append((t.name, lambda t=t, meta=meta: _layer_bytes(art.backbone, meta, base, t.name)))
    return _write(out, writer, data)


def _layer_bytes(backbone: Path, meta: Any, base: Base, name: str) -> np.ndarray:
    """The stored layer as GGUF tensor data, uint8 [out, row bytes], rows in llama.cpp's order."""
    weight = read_layer(backbone, meta)
    # a GGUF type's data is one qweight tensor [out, row bytes]; a keep is the 16-bit weight's bytes
    rows = weight.contiguous().view(torch.uint8) if meta.spec is None else weight.tensors()["qweight"]
    return base.permute(rows, name).contiguous().numpy()


# ---------------------------------------------------------------- adapter.gguf
def file_alpha(alphas: Mapping[str, float]) -> float:
    """The file's one alpha: the most common layer alpha (the largest among ties; 1 if all are 0,
    since llama.cpp reads alpha 0 as 'no scaling')."""
    counts = Counter(float(a) for a in alphas.values())
    best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else 1.0
    return best if best > 0 else 1.0


def write_adapter_gguf(out: Path, base: Base, state: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
                       alphas: Mapping[str, float], dtype: str = DEFAULT_ADAPTER_DTYPE) -> Path:
    """``out``: llama.cpp's LoRA adapter GGUF from PEFT adapter weights ``state`` (keys
    ``base_model.model.NAME.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r]) with PEFT's scaling
    alphas[NAME] / ranks[NAME], tensors stored as ``dtype`` (``f16`` or ``f32``: values rounded to
    nearest from fp32); see the module docstring for the folding and the permutation. Every tensor
    is converted and checked (finite, within f16's range) before the file is opened."""
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise PlannerError(f"adapter dtype must be one of {', '.join(ADAPTER_DTYPES)}; got {dtype!r}")
    alpha = file_alpha({n: alphas[n] for n, r in ranks.items() if r})
    writer = base.writer()
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    data = []
    for layer, r in sorted(ranks.items()):
        if not r:
            continue
        try:
            a, b = state[f"{peft_key(layer)}.lora_A.weight"], state[f"{peft_key(layer)}.lora_B.weight"]
        except KeyError as err:
            raise PlannerError(f"the adapter has no {err.args[0]}") from None
        name = base.tensor_name(layer)
        a = a.detach().float().cpu()
        b = base.permute(b.detach().float().cpu() * (float(alphas[layer]) / alpha), name)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            t = _stored(t, dtype, name + suffix)
            nbytes = t.numel() * t.element_size()
            writer.add_tensor_info(name + suffix, tuple(t.shape), np.dtype(t.numpy().dtype), nbytes)
            data.append((name + suffix, lambda t=t: t.numpy()))
    return _write(out, writer, data)


def _stored(t: torch.Tensor, dtype: str, name: str) -> torch.Tensor:
    """fp32 ``t`` as ``dtype``, contiguous; PlannerError on a value it cannot hold."""
    if not torch.isfinite(t).all():
        raise PlannerError(f"adapter tensor {name} has non-finite values; refusing to write adapter.gguf")
    peak = float(t.abs().max()) if t.numel() else 0.0
    if dtype == "f16" and peak > FP16_MAX:
        raise PlannerError(f"adapter tensor {name} has a value of magnitude {peak:.6g} (after alpha folding), beyond "
                           f"f16's {FP16_MAX:g}: pass --gguf-adapter-dtype f32")
    return t.to(ADAPTER_DTYPES[dtype]).contiguous()


def export_gguf(artifact: Path, base_path: Path, adapter_dtype: str = DEFAULT_ADAPTER_DTYPE) -> Path:
    """``artifact/gguf/``: model.gguf, and adapter.gguf (tensors in ``adapter_dtype``) from
    ``artifact/adapter`` when the plan has ranks."""
    from planner.artifact.layout import ADAPTER, ADAPTER_WEIGHTS
    from planner.files.tensors import load_tensors

    base = Base(base_path)
    art = read_artifact(artifact)
    folder = artifact / GGUF_DIR
    write_model_gguf(artifact, base, folder / MODEL_GGUF)
    if art.ranks():
        state = load_tensors(artifact / ADAPTER / ADAPTER_WEIGHTS)
        write_adapter_gguf(folder / ADAPTER_GGUF, base, state, art.ranks(), art.alphas(), adapter_dtype)
    log.debug("wrote %s from %s and %s", folder, artifact / PLAN_FILE, base_path)
    return folder
