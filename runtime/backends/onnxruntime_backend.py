"""ONNX Runtime backend: any execution provider the installed onnxruntime has."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

# ONNX Runtime's own "[E:onnxruntime:...]" lines would come before our one-line error; its errors reach us as
# exceptions anyway.
ort.set_default_logger_severity(3)

from ..cache import mark_used, prune
from ..errors import EdgesdError
from ..graphs import ONNX_TO_NUMPY, GraphSpec, check_feed
from ..tensor_files import onnx_initializers
from .base import RuntimeOptions, add_delta, check_names, fit_feeds
from .providers import ProviderRegistry, SessionProviders, placement

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# How ONNX Runtime's allocators say they are out of memory (its arena; CUDA's cudaMalloc)
OUT_OF_MEMORY = ("bfc_arena", "Failed to allocate memory", "out of memory", "std::bad_alloc")

REGISTRY = ProviderRegistry(ort)  # ONNX Runtime registers plugin EP libraries once per process


def provider_names() -> list[str]:
    """The providers usable here (installed, with a device)."""
    return [status.provider.name for status in REGISTRY.statuses() if status.usable]


class OrtGraph:
    def __init__(self, path: Path, spec: GraphSpec, options: RuntimeOptions,
                 weight_deltas: dict | None = None):
        self.path = Path(path)
        self.spec = spec
        providers = REGISTRY.session_providers(options.provider, dict(options.provider_options), options.device_arena)

        def session_options() -> ort.SessionOptions:
            made = ort.SessionOptions()
            made.log_severity_level = 3
            made.add_session_config_entry("session.record_ep_graph_assignment_info", "1")  # placement
            # Without the arena, memory goes back after each run: on the SD 1.5 U-Net (512x512, batch 2) peak
            # RSS fell from 8.1 to 6.5 GB, step time within noise (bench/ort_session_memory.py, bench/results/).
            made.enable_cpu_mem_arena = False
            made.graph_optimization_level = OPTIMIZATION_LEVELS[options.ort_optimization]
            if options.threads:
                made.intra_op_num_threads = options.threads
            return made

        try:
            if weight_deltas:  # a LoRA: the changed weights go into the session, never into a file or the cache
                made = session_options()
                source, self._overrides = _changed_model(self.path, weight_deltas, made)
                self._session = ort.InferenceSession(source, made, **providers.apply(made))
            else:
                self._overrides = []
                cache = options.cache_folder()
                if cache is None:
                    made = session_options()
                    self._session = ort.InferenceSession(str(self.path), made, **providers.apply(made))
                else:
                    self._session = _cached_session(self.path, cache, session_options, providers, options)
        except EdgesdError:
            raise
        except Exception as e:  # onnxruntime raises several unrelated types for a bad file
            reason = str(e).splitlines()[0][:200]
            raise EdgesdError(
                f"{self.path} is not a loadable ONNX graph ({reason})",
                "re-export the model with `edgesd export`",
            ) from None
        self.placement = placement(self._session)  # provider -> nodes it runs (the rest fell back)
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._outputs = check_names(self.path, spec, set(self._inputs), {o.name for o in self._session.get_outputs()},
                                    "export it with `edgesd export` or `optimum-cli export onnx`")
        self._passed_on = {t.name for t in spec.added_outputs}
        self._ranks = {name: len(i.shape) for name, i in self._inputs.items()}
        self._dtypes = {name: self.input_dtype(name) for name in self._inputs}
        self._memory = providers.memory if options.io_binding == "auto" else None  # (device type, id) or None
        # --device-arena per-run / per-stage: the RunOptions after which the arena shrinks to what is in use
        self._release_options = None
        if providers.release_config:
            self._release_options = ort.RunOptions()
            for key, value in providers.release_config:
                self._release_options.add_run_config_entry(key, value)
        self._release_every_run = providers.release_every_run
        self._provider_names = options.provider

    def input_dtype(self, name: str) -> np.dtype:
        onnx_type = self._inputs[name].type
        if onnx_type not in ONNX_TO_NUMPY:
            raise EdgesdError(f"{self.path}: input '{name}' has unsupported type {onnx_type}")
        return np.dtype(ONNX_TO_NUMPY[onnx_type])

    def run(self, feeds: dict[str, np.ndarray], local: dict | None = None,
            release: bool = False) -> dict[str, np.ndarray]:
        """InferenceSession.run may be called from several threads at once; per-caller state (I/O binding's
        inputs kept in device memory) is in `local`. `release`: with --device-arena per-stage, the arena
        gives back its free memory after this run."""
        check_feed(self.spec, feeds)
        cast = fit_feeds(self.path, feeds, self._dtypes, self._ranks)
        run_options = self._release_options if release or self._release_every_run else None
        try:
            if self._memory is None:
                values = self._session.run(self._outputs, cast, run_options)
            else:
                values = self._run_bound(feeds, cast, {} if local is None else local, run_options)
        except Exception as e:  # a graph that loads but cannot run these shapes
            shapes = {k: v.shape for k, v in cast.items()}
            if any(sign in str(e) for sign in OUT_OF_MEMORY):
                raise EdgesdError(f"{self.path} ran out of memory on inputs {shapes} (provider {self._provider_names})",
                                  "use a smaller size or batch, the fp16-compute recipe on a GPU, or raise the "
                                  "provider's memory limit (e.g. --provider-option gpu_mem_limit=BYTES)") from None
            reason = str(e).splitlines()[0][:240]
            raise EdgesdError(f"{self.path} failed on inputs {shapes} ({reason})",
                              "check the requested size and batch, or re-export the model") from None
        # fp16 outputs come back as fp32, but those added for another graph (spec.added_outputs) stay as they
        # are: converting DeepCache's (2, 640, 64, 64) features and back cost tens of ms a step
        return {name: np.asarray(v, dtype=np.float32) if v.dtype == np.float16 and name not in self._passed_on else v
                for name, v in zip(self._outputs, values)}

    def _run_bound(self, feeds: dict[str, np.ndarray], cast: dict[str, np.ndarray], local: dict,
                   run_options) -> list:
        """One run with I/O binding: outputs made in the provider's memory and copied out once; an input that
        is the same array as in one of the caller's last two runs (`local`; two: split guidance alternates the
        negative and positive prompt's embeddings) stays in that memory, copied there once."""
        device, device_id = self._memory
        binding = self._session.io_binding()
        kept = local.setdefault("on_device", {})  # input name -> [(the caller's array, its OrtValue there)]
        for name, value in cast.items():
            recent = kept.setdefault(name, [])
            match = next((on_device for array, on_device in recent if array is feeds[name]), None)
            if match is None:
                match = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, device_id)
                recent[:] = [*recent[-1:], (feeds[name], match)]  # arrays held, so `is` cannot match a new one
            binding.bind_ortvalue_input(name, match)
        for name in self._outputs:
            binding.bind_output(name, device, device_id)
        self._session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()


def _changed_model(path: Path, deltas: dict, session_options) -> tuple[str | bytes, list]:
    """The graph with each initializer in `deltas` changed by it: weights kept in the external data file are
    given as external initializers, those inside the graph file are patched into a copy of its bytes (ONNX
    Runtime's add_initializer is not seen by its NCHWc layout pass, so a changed convolution would keep its old
    weights). Returns (what InferenceSession loads, the values it must keep alive)."""
    found = onnx_initializers(path, set(deltas))
    missing = sorted(set(deltas) - set(found))
    if missing:
        raise EdgesdError(f"{path} has no weight {missing[0]} (its weights.json is out of date)", "re-export the model")
    changed = {name: add_delta(found[name].read(), delta, f"{path}: {name}") for name, delta in deltas.items()}
    external = [name for name in changed if found[name].file != path]
    values = [ort.OrtValue.ortvalue_from_numpy(changed[name]) for name in external]
    if external:
        session_options.add_external_initializers(external, values)
    inline = [name for name in changed if found[name].file == path]
    if not inline:
        return str(path), values
    data = bytearray(path.read_bytes())
    for name in inline:
        init = found[name]
        data[init.offset:init.offset + init.length] = changed[name].tobytes()
    # loaded from bytes, the graph's other external weights are found beside the file
    session_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(path.parent))
    return bytes(data), values


def _fingerprint(path: Path) -> list[str]:
    """The graph and its external data files: name, size, time, and a hash of their first and last MiB."""
    parts = []
    for f in sorted(path.parent.iterdir()):
        if f.name.startswith(path.name):
            st = f.stat()
            digest = hashlib.sha256()
            with f.open("rb") as file:
                digest.update(file.read(1 << 20))
                if st.st_size > 2 << 20:
                    file.seek(-(1 << 20), os.SEEK_END)
                    digest.update(file.read())
            parts += [f.name, str(st.st_size), str(st.st_mtime_ns), digest.hexdigest()]
    return parts


def _cache_names(path: Path, options: RuntimeOptions) -> tuple[str, str]:
    """(the prefix of every cached copy of this source file under these options, this copy's file name). The
    prefix: the source's path, onnxruntime's version, the machine, the providers and the optimisation level;
    the rest: the source's fingerprint, so a changed file gets a new copy and its old one is removed."""
    import platform

    setting = [str(path.resolve()), ort.__version__, platform.machine(), options.ort_optimization, options.provider,
               repr(options.provider_options)]
    prefix = f"{path.parent.name}-{hashlib.sha256(chr(10).join(setting).encode()).hexdigest()[:16]}-"
    return prefix, prefix + hashlib.sha256(chr(10).join(_fingerprint(path)).encode()).hexdigest()[:16] + ".onnx"


def _cached_session(path: Path, cache_dir: Path, session_options: Callable[[], ort.SessionOptions],
                    providers: SessionProviders, options: RuntimeOptions) -> ort.InferenceSession:
    """Load the optimised copy of `path` from `cache_dir`, or optimise `path` and save the copy there.

    The saved copy is already optimised, so it loads with optimisation off: the second start skips the
    graph rewrites (and for large graphs, the constant folding) that the first one paid for. A copy that does
    not load (cut short, corrupt) is removed and made again; copies of an older version of the same source
    file are removed when the new one is written; then the folder is held to options.cache_max_gb.
    """
    started = time.time()
    session = _optimised_session(path, cache_dir, session_options, providers, options)
    prune(cache_dir, options.cache_max_bytes(), used_since=started)
    return session


def _optimised_session(path: Path, cache_dir: Path, session_options: Callable[[], ort.SessionOptions],
                       providers: SessionProviders, options: RuntimeOptions) -> ort.InferenceSession:
    prefix, name = _cache_names(path, options)
    cached = cache_dir / name
    if cached.is_file():
        made = session_options()
        made.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(cached), made, **providers.apply(made))
            mark_used(cached, cache_dir / (name + ".data"))
            return session
        except Exception:  # a damaged entry is rebuilt, not fatal
            for f in (cached, cache_dir / (name + ".data")):
                f.unlink(missing_ok=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    except OSError as e:
        raise EdgesdError(f"cannot write the cache folder {cache_dir} ({e.strerror})",
                          "pass a writable --cache-dir, or --cache off") from None
    try:
        made = session_options()
        made.optimized_model_filepath = str(staging / name)
        # Weights go to one side file (a graph file cannot exceed 2 GB); the file name is the final one.
        made.add_session_config_entry("session.optimized_model_external_initializers_file_name", name + ".data")
        made.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(path), made, **providers.apply(made))
        except Exception:  # saving the copy failed (a full disk?): load without it; a bad graph fails again
            made = session_options()
            return ort.InferenceSession(str(path), made, **providers.apply(made))
        for old in cache_dir.glob(prefix + "*"):  # the copy of an older version of this source file
            old.unlink(missing_ok=True)
        # Data first, graph last: a graph file in the cache always has its data beside it.
        for part in (name + ".data", name):
            if (staging / part).is_file():
                try:
                    os.replace(staging / part, cache_dir / part)
                except OSError:  # a full disk: this run goes on, the next one optimises again
                    break
        return session
    finally:
        shutil.rmtree(staging, ignore_errors=True)
