"""The peer runtimes `mtbert-fast bench` measures beside HF and mtbert_fast: torch.compile of the HF model, ONNX
Runtime, OpenVINO, CTranslate2 and torch's dynamic int8 quantization of the HF model.

Each is optional: a package that is missing, an export that fails or a dtype that a runtime lacks makes that
provider a skip with the reason, and the run goes on. Every provider is built from the same HF float32 model, runs
with the same thread count, and maps a batch (a dict of [B, L] tensors: input_ids, attention_mask and
token_type_ids as the model takes them, padding at the end of each row) to the last hidden state [B, L, H] (values
at padding positions unspecified). Exports (ONNX files, an OpenVINO model, a CTranslate2 directory) are made once
per model and shared by the dtypes that use them.
"""

from __future__ import annotations

import copy
import importlib
import json
import multiprocessing
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INT8 = "int8"
NAMES = ("torch.compile", "onnxruntime", "openvino", "ctranslate2", "torch.quantize_dynamic")
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")  # HF BertModel.forward's positional order
OUTPUTS = ("last_hidden_state", "pooler_output")

Run = Callable[[dict], torch.Tensor]


def _ctranslate2_worker(conn, path: str, compute: str, threads: int) -> None:
    """CTranslate2's encoder, serving forward_batch over `conn` until the pipe closes. It runs in a process of its
    own because, once it has run in a process, every later OpenMP parallel region of torch there is slower (on a
    2-core EPYC, a [16, 384] x [384, 1536] oneDNN linear took 107 us instead of 56, a LayerNorm 55 us instead of 8),
    which would be charged to every provider timed after it. (Importing it and asking its compute types does not.)"""
    import ctranslate2

    encoder = ctranslate2.Encoder(path, device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1)
    conn.send("ready")
    while True:
        try:
            ids, token_types = conn.recv()
        except EOFError:
            return
        try:
            conn.send(np.array(encoder.forward_batch(ids, token_type_ids=token_types).last_hidden_state))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which raises it
            conn.send(RuntimeError(f"CTranslate2: {type(exc).__name__}: {exc}"))


class Unavailable(Exception):
    """A peer provider that cannot run here; the message says why."""


def _require(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise Unavailable(f"{package} is not installed (pip install {package})") from None


def _failed(what: str, exc: Exception) -> Unavailable:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return Unavailable(f"{what} failed: {type(exc).__name__}: {first}")


def _outputs(model: torch.nn.Module) -> list[str]:
    """The outputs an export has: the pooler's only where the model has one (DistilBERT and ELECTRA have none)."""
    return list(OUTPUTS if getattr(model, "pooler", None) is not None else OUTPUTS[:1])


class _Positional(torch.nn.Module):
    """The HF model called with its inputs by position, returning (last_hidden_state, pooler_output) or, without a
    pooler, (last_hidden_state,): the form the ONNX exporters take."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        return tuple(getattr(out, name) for name in _outputs(self.model))


def _pad_to(hidden: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(hidden, (0, 0, 0, width - hidden.shape[1]))


class Peers:
    """The peer providers of one HF float32 model (sdpa attention, on the cpu unless only torch.compile is asked).

    sample: a batch with rows of different lengths, used to trace the exports and to try each provider once when
    it is built (a provider that fails there is a skip). workdir: where the exports go; threads: the thread
    count every runtime gets; selected: the peers (of NAMES) to build, the others are left out.
    """

    def __init__(self, hf32: torch.nn.Module, sample: dict, workdir: str | Path, threads: int,
                 selected: tuple[str, ...] = NAMES):  # fmt: skip
        self.hf32, self.sample, self.workdir, self.threads = hf32, sample, Path(workdir), threads
        self.selected = selected
        self.names = [n for n in INPUT_ORDER if n in sample]
        self._made: dict[str, object] = {}

    def providers(self, dtype_name: str, device: torch.device) -> tuple[dict[str, Run], dict[str, str]]:
        """(provider name -> run, skipped peer -> why) for the rows of `dtype_name` ("float32", "bfloat16",
        "float16" or "int8") on `device`."""
        runs, skipped = {}, {}
        for label, build in self._builders(dtype_name):
            if label not in self.selected:
                continue
            try:
                if device.type != "cpu" and label != "torch.compile":
                    raise Unavailable(f"runs on cpu only here (asked {device.type})")
                name, run = build()
                self._try(run)
                runs[name] = run
            except Unavailable as exc:
                skipped[f"{label} {dtype_name}"] = str(exc)
        return runs, skipped

    def _builders(self, dtype_name: str) -> list[tuple[str, Callable[[], tuple[str, Run]]]]:
        if dtype_name == INT8:
            return [("onnxruntime", lambda: self._onnxruntime(INT8)), ("ctranslate2", lambda: self._ctranslate2(INT8)),
                    ("torch.quantize_dynamic", self._torch_int8)]  # fmt: skip
        return [("torch.compile", lambda: self._compiled(dtype_name)),
                ("onnxruntime", lambda: self._onnxruntime(dtype_name)),
                ("openvino", lambda: self._openvino(dtype_name)),
                ("ctranslate2", lambda: self._ctranslate2(dtype_name))]  # fmt: skip

    def _try(self, run: Run) -> None:
        try:
            run(self.sample)
        except Exception as exc:  # a runtime can fail at its first call in its own ways; show why, run the rest
            raise _failed("the first call", exc) from exc

    def _once(self, key: str, make: Callable[[], object]):
        """make(), or the Unavailable it raised, remembered under `key` for the other dtypes."""
        if key not in self._made:
            try:
                self._made[key] = make()
            except Unavailable as exc:
                self._made[key] = exc
        made = self._made[key]
        if isinstance(made, Unavailable):
            raise made
        return made

    def _feed(self, batch: dict) -> dict[str, np.ndarray]:
        return {n: batch[n].cpu().numpy() for n in self.names}

    # --- torch ---------------------------------------------------------------------------------------------

    def _compiled(self, dtype_name: str) -> tuple[str, Run]:
        """torch.compile (inductor) of the HF sdpa model in that dtype. Each new shape compiles at its first call,
        in the untimed pass of the point that brings it; later shapes reuse a dynamic-shape graph."""
        torch._dynamo.reset()  # this model's graphs do not count against the recompile limit of earlier ones
        model = copy.deepcopy(self.hf32).to(dtype=getattr(torch, dtype_name))
        compiled = torch.compile(model)
        return "torch.compile", lambda batch: compiled(**batch).last_hidden_state

    def _torch_int8(self) -> tuple[str, Run]:
        """torch.ao.quantization.quantize_dynamic of the HF sdpa model: qint8 weights on every nn.Linear."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its deprecation notice, once per call
                model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.hf32), {torch.nn.Linear},
                                                               dtype=torch.qint8)  # fmt: skip
        except (AttributeError, RuntimeError) as exc:
            raise _failed("torch.ao.quantization.quantize_dynamic", exc) from exc
        return "torch.quantize_dynamic", lambda batch: model(**batch).last_hidden_state

    # --- ONNX Runtime --------------------------------------------------------------------------------------

    def _onnxruntime(self, dtype_name: str) -> tuple[str, Run]:
        """float32: the graph ORT's transformer optimizer fused (attention, LayerNorm, GELU) where the fusion
        works, else the plain export; int8: that graph with int8 weights (quantize_dynamic, QInt8)."""
        ort = _require("onnxruntime")
        if dtype_name not in ("float32", INT8):
            raise Unavailable(f"ONNX Runtime has no fast {dtype_name} path on cpu")
        path, kind = self._once("onnx", self._export_onnx)
        if dtype_name == INT8:
            path = self._once("onnx-int8", lambda: self._quantize_onnx(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # an ORT that cannot load this graph says so in its own exception types
            raise _failed("loading the ONNX model", exc) from exc
        return f"onnxruntime[{kind}]", lambda batch: torch.from_numpy(session.run(None, self._feed(batch))[0])

    def _export_onnx(self) -> tuple[Path, str]:
        """(path, "fused") from the TorchScript exporter of the eager-attention model and ORT's optimizer (the
        only route whose attention it fuses), else (path, "plain") from the dynamo exporter."""
        _require("onnx")
        try:
            return self._export_fused(), "fused"
        except Exception:  # noqa: BLE001 - any failure of this route leaves the plain export
            pass
        _require("onnxscript")
        path = self.workdir / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Positional(self.hf32, self.names), tuple(self.sample[n] for n in self.names),
                                  str(path), input_names=self.names, output_names=_outputs(self.hf32), dynamo=True,
                                  dynamic_axes={n: {0: "batch", 1: "length"} for n in self.names},
                                  verbose=False)  # fmt: skip
        except Exception as exc:  # export of an HF model fails in many version-specific ways; show why
            raise _failed("ONNX export (dynamo)", exc) from exc
        return path, "plain"

    def _export_fused(self) -> Path:
        from onnxruntime.transformers.optimizer import optimize_model

        eager = copy.deepcopy(self.hf32)
        eager.set_attn_implementation("eager")
        raw, fused = self.workdir / "model-torchscript.onnx", self.workdir / "model-fused.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Positional(eager.eval(), self.names), tuple(self.sample[n] for n in self.names),
                              str(raw), input_names=self.names, output_names=_outputs(self.hf32), dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "length"} for n in self.names})  # fmt: skip
        config = self.hf32.config
        model = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)  # fmt: skip
        if not model.get_fused_operator_statistics().get("Attention"):
            raise Unavailable("ORT's optimizer fused no attention")
        model.save_model_to_file(str(fused))
        return fused

    def _quantize_onnx(self, path: Path) -> Path:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = self.workdir / "model-int8.onnx"
        try:  # the fused graph's com.microsoft ops defeat shape inference: untyped tensors are float
            quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
        except Exception as exc:  # the quantizer's failures come in its own exception types
            raise _failed("onnxruntime.quantization.quantize_dynamic", exc) from exc
        return out

    # --- OpenVINO ------------------------------------------------------------------------------------------

    def _openvino(self, dtype_name: str) -> tuple[str, Run]:
        """float32: compiled with INFERENCE_PRECISION_HINT=f32; bfloat16: with OpenVINO's default precision, where
        that is bf16 (it picks bf16 on CPUs that have it)."""
        ov = _require("openvino")
        if dtype_name not in ("float32", "bfloat16"):
            raise Unavailable(f"no {dtype_name} rows for OpenVINO (f32, or its default bf16)")
        model = self._once("openvino", lambda: self._convert_openvino(ov))
        hint = {"INFERENCE_PRECISION_HINT": "f32"} if dtype_name == "float32" else {}
        try:
            compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, **hint})
        except Exception as exc:  # OpenVINO reports a graph its CPU plugin cannot compile in its own types
            raise _failed("openvino compile_model", exc) from exc
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if dtype_name == "bfloat16" and precision != "bf16":
            raise Unavailable(f"OpenVINO's default precision on this cpu is {precision}, not bf16")
        request = compiled.create_infer_request()

        def run(batch):  # the output buffer is reused by the next infer(): copy it at once
            return torch.from_numpy(np.array(request.infer(self._feed(batch))[0], copy=True))

        return f"openvino[{'f32' if hint else 'default=' + precision}]", run

    def _convert_openvino(self, ov):
        try:
            return ov.convert_model(self.hf32, example_input={n: self.sample[n] for n in self.names},
                                    input=[(n, [-1, -1]) for n in self.names])  # fmt: skip
        except Exception as exc:  # conversion fails in many version-specific ways; show why
            raise _failed("openvino.convert_model", exc) from exc

    # --- CTranslate2 ---------------------------------------------------------------------------------------

    def _ctranslate2(self, dtype_name: str) -> tuple[str, Run]:
        """ctranslate2.Encoder on the converted model, compute_type float32 or int8, fed unpadded token-id lists,
        in a process of its own (see _ctranslate2_worker): its times include handing the token ids over and the
        hidden states back through a pipe (about 1% of a call at these sizes)."""
        ct2 = _require("ctranslate2")
        compute = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", INT8: "int8"}[dtype_name]
        supported = ct2.get_supported_compute_types("cpu")
        if compute not in supported:
            raise Unavailable(f"CTranslate2 has no {compute} on this cpu (it has {', '.join(sorted(supported))})")
        path = self._once("ctranslate2", lambda: self._convert_ctranslate2(ct2))
        spawn = multiprocessing.get_context("spawn")
        conn, child = spawn.Pipe()
        spawn.Process(target=_ctranslate2_worker, args=(child, str(path), compute, self.threads), daemon=True).start()
        child.close()  # the worker holds it now: if the worker dies, recv sees the pipe close instead of waiting
        try:
            conn.recv()  # "ready"
        except EOFError:
            raise Unavailable("the CTranslate2 worker process ended before its encoder was ready") from None

        def run(batch):
            lengths = batch["attention_mask"].sum(1).tolist()
            rows = {n: [r[:k] for r, k in zip(batch[n].tolist(), lengths)] for n in ("input_ids", "token_type_ids")
                    if n in batch}  # fmt: skip
            conn.send((rows["input_ids"], rows.get("token_type_ids")))
            out = conn.recv()
            if isinstance(out, Exception):
                raise out
            return _pad_to(torch.from_numpy(out), batch["input_ids"].shape[1])

        return "ctranslate2", run

    def _convert_ctranslate2(self, ct2) -> Path:
        saved, out = self.workdir / "hf", self.workdir / "ctranslate2"
        self.hf32.save_pretrained(saved)
        config_path = saved / "config.json"
        config = json.loads(config_path.read_text())
        config.setdefault("position_embedding_type", "absolute")  # transformers 5 no longer writes it
        config_path.write_text(json.dumps(config))
        try:
            ct2.converters.TransformersConverter(str(saved)).convert(str(out))
        except Exception as exc:  # the converter refuses unknown architectures in its own ways; show why
            raise _failed("the CTranslate2 conversion", exc) from exc
        return out
