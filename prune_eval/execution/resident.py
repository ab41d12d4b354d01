"""The model a worker keeps between cells: loaded once per model, compiled once per worker.

A sweep's cells mostly share one checkpoint: `method=visionzip,sparsevlm seed=0,1,2,3,4` is six
computations on one LLaVA. Loading 13 GB and compiling the decoder for each of them cost more than
some of the cells themselves (issue 20: 224 s for ten cells whose unique work is ~215 s of one GPU).
A worker (one process per GPU, one SLURM task, or the sweep's own process with `launch=local`) holds
one `Resident` model and hands it to every cell with the same `CellSpec.model_key` (checkpoint,
quantization, device); another key replaces it, freeing the GPU memory first. The compiled decoder
(eval.compile=true) is built the first time a cell asks for it and kept with the model; torch's
compiled graphs are kept by torch itself (per code object), so even a new model of the same
architecture does not compile again.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass

import torch

from prune_eval.execution import faults
from prune_eval.models.llm import LanguageModel
from prune_eval.models.loading import ModelBundle
from prune_eval.specs import CellSpec

log = logging.getLogger("prune_eval")


def dynamo_compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (dynamo + inductor, every frame).

    Read from torch._dynamo.utils.compilation_time_metrics['_compile.compile_inner'], dynamo's own
    per-frame timer (present in torch 2.1 to 2.13); 0.0 where this torch does not keep it.
    """
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
    except Exception:  # private API: a missing or renamed timer must not fail a cell
        return 0.0


@dataclass
class Resident:
    key: str
    bundle: ModelBundle
    load_s: float
    compiled_lm: LanguageModel | None = None


@dataclass
class ResidentModels:
    """At most one loaded model per process; `loads` counts the loads (tests check it)."""

    current: Resident | None = None
    loads: int = 0

    def get(self, spec: CellSpec, *, compiled: bool) -> tuple[ModelBundle, float]:
        """(the bundle for this cell, seconds spent loading it now: 0.0 when it was resident)."""
        load_s = 0.0
        if self.current is None or self.current.key != spec.model_key:
            self.release()
            self.current = self._load(spec)
            self.loads += 1
            load_s = self.current.load_s
        resident = self.current
        if not compiled:
            return resident.bundle, load_s
        if resident.compiled_lm is None:
            resident.compiled_lm = resident.bundle.lm.compiled()
        return dataclasses.replace(resident.bundle, lm=resident.compiled_lm), load_s

    def release(self) -> None:
        """Drop the resident model and give its GPU memory back."""
        if self.current is None:
            return
        log.info("releasing model %s", self.current.bundle.info.get("name"))
        self.current = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _load(spec: CellSpec) -> Resident:
        from prune_eval.models import loading
        from prune_eval.models.quant import check_backend

        precision = spec.quant.precision
        device = loading.resolve_device(spec.device)
        check_backend(precision, device, (spec.geometry.text_hidden, spec.geometry.text_intermediate))
        started = time.perf_counter()
        bundle = loading.load(spec.model, dtype=precision.dtype, device=device, quantization_config=precision.quantization_config)
        load_s = time.perf_counter() - started
        bundle.info["quantization"] = {"name": precision.name, "scope": spec.quant.scope, "skipped_modules": precision.skipped_modules,
                                       "n_quantized_modules": len(bundle.info["quantized_modules"])}
        log.info("loaded model %s (%s, %s) in %.1f s; kept for the cells that use it", spec.model.name, spec.quant.name, device, load_s)
        faults.checkpoint("load")
        return Resident(spec.model_key, bundle, load_s)


PROCESS_MODELS = ResidentModels()  # this process's resident model (one worker per process)
