"""End-to-end generation benchmark (``qoq bench e2e``): float16/bfloat16 vs QoQ W4A8KV4 through HF generate.

Models are built from a config with random weights (no download): Llama-3-8B-shaped and
Qwen1.5-72B-shaped. The quantized model is built on the meta device and filled layer by layer with random
weights quantized in the real formats, so a model whose float weights do not fit the GPU still runs.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

SHAPES = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "qwen1.5-72b": dict(
        model_type="qwen2", hidden_size=8192, intermediate_size=24576, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=64, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    "tiny": dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
    ),
}


def model_config(shape: str):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def _materialize_(model: nn.Module, config, device: str, seed: int) -> None:
    """Fill a model moved off the meta device with ``to_empty``: random weights, unit norms, fresh RoPE tables."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
        else:
            param.normal_(0.0, 0.02)
    rotary = model.model.rotary_emb  # its inv_freq buffer is computed at construction, not loaded
    model.model.rotary_emb = type(rotary)(config=config).to(device)


def build_float_model(shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0) -> nn.Module:
    """A random-weight ``*ForCausalLM`` of the given shape, materialised directly on ``device``."""
    from transformers import AutoModelForCausalLM

    config = model_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    _materialize_(model, config, device, seed)
    return model.eval()


@torch.no_grad()
def build_quantized_model(shape: str, group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                          device: str = "cuda", seed: int = 0, quantize_lm_head: bool = False) -> nn.Module:
    """A random-weight QoQ W4A8KV4 model: skeleton on meta, each linear (and ``lm_head`` with
    ``quantize_lm_head``) filled with a quantized random weight."""
    from transformers import AutoModelForCausalLM

    from . import ops
    from .api import finish_patching
    from .models import patch_model
    from .nn import QoQLinear
    from .quantization import QoQConfig

    config = model_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    patch_model(model, None, group_size, quantize_lm_head=quantize_lm_head)
    model.to_empty(device=device)
    _materialize_(model, config, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QoQLinear):
            w = torch.randn(module.out_features, module.in_features, device=device, generator=gen) * 0.02
            qw = (ops.quantize_weight_per_channel(w) if group_size == -1
                  else ops.quantize_weight_per_group(w, group_size))
            bias = None if module.bias is None else torch.zeros_like(module.bias)
            module.load_weight(qw, bias)
            del w, qw
    finish_patching(model, QoQConfig(group_size=group_size, quantize_lm_head=quantize_lm_head))
    return model.eval()


# variant -> None (stock bf16) or (group size, quantize_lm_head) of the QoQ model
VARIANTS: dict[str, tuple[int, bool] | None] = {
    "bf16": None,
    "qoq-g128": (128, False),
    "qoq-channel": (-1, False),
    "qoq-g128-lmhead": (128, True),
    "qoq-channel-lmhead": (-1, True),
}


def check_variants(variants) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")


def build_variant(shape: str, variant: str, device: str = "cuda") -> nn.Module:
    """The random-weight model of ``shape`` that ``variant`` (a key of ``VARIANTS``) names."""
    check_variants([variant])
    layout = VARIANTS[variant]
    if layout is None:
        return build_float_model(shape, device=device)
    group_size, quantize_lm_head = layout
    return build_quantized_model(shape, group_size=group_size, device=device, quantize_lm_head=quantize_lm_head)


@dataclass
class GenerateResult:
    model: str
    variant: str
    batch: int
    prompt_len: int
    new_tokens: int
    tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    peak_mem_gb: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


PLAIN_INDUCTOR = "default"  # torch.compile's mode without CUDA graphs: the fallback where graph capture fails


class _StopAfter:
    """Stopping criterion: end ``generate`` after ``n`` new tokens although the cache was sized for more."""

    def __init__(self, prompt_len: int, n: int):
        self.limit = prompt_len + n

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool,
                          device=input_ids.device)


STOP_CHECKS = ("model-default", "per-step", "deferred")


class StopCheckMode:
    """Context manager: how ``generate`` checks its stopping criteria on CUDA, for every model.

    transformers reads the stop flag back every step (the host waits for the GPU), except where its
    ``DeferredStopCheck.is_supported`` allows reading it one step late (``mps`` only; QoQ models also for their KV4
    caches on CUDA, qoq_torch.nn.generation). ``mode``: "model-default" leaves that decision alone, "per-step" forces
    the per-step read on CUDA, "deferred" allows the late read on CUDA under transformers' own conditions (no
    assistant model; a returned cache must be croppable). ``deferred`` counts the generate calls that read late."""

    def __init__(self, mode: str = "deferred"):
        if mode not in STOP_CHECKS:
            raise ValueError(f"unknown stop check {mode!r}; choose from {STOP_CHECKS}")
        self.mode = mode
        self.deferred = 0
        self._original = None

    def __enter__(self) -> "StopCheckMode":
        from transformers.generation import utils as gen_utils

        cls = getattr(gen_utils, "DeferredStopCheck", None)
        if cls is None or "is_supported" not in cls.__dict__:
            raise RuntimeError("this transformers version has no DeferredStopCheck.is_supported to extend")
        self._cls, self._original = cls, cls.__dict__["is_supported"]
        original = self._original.__func__

        def is_supported(device, cache, cache_is_returned, is_assistant):
            if torch.device(device).type != "cuda" or self.mode == "model-default":
                ok = original(device, cache, cache_is_returned, is_assistant)
            elif self.mode == "per-step":
                ok = False
            else:
                ok = not is_assistant and (cache is None or cache.is_croppable or not cache_is_returned)
            self.deferred += int(ok)
            return ok

        cls.is_supported = staticmethod(is_supported)
        return self

    def __exit__(self, *exc) -> None:
        self._cls.is_supported = self._original


MODEL_DEFAULT = "model-default"  # the compile config generate uses when given none (transformers: reduce-overhead)
EAGER = "eager"  # no compilation: generate with disable_compile, as a user who does not compile runs it


def _json_safe(value):
    """``value`` with functions (a compile config's ``guard_filter_fn``) replaced by their dotted names."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return value


def compile_config_for(model: nn.Module, compile_mode: str | None):
    """The ``CompileConfig`` generate will compile the decode step with: the model's own default for
    "model-default", ``torch.compile``'s ``mode`` otherwise; None (eager) for None or "eager"."""
    from transformers.generation.configuration_utils import CompileConfig

    if compile_mode is None or compile_mode == EAGER:
        return None
    return model._default_compile_config() if compile_mode == MODEL_DEFAULT else CompileConfig(mode=compile_mode)


def run_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, compile_mode: str | None,
                 stop_after: int | None = None) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens with a static cache sized for them (compiled by
    transformers with ``compile_config_for(model, compile_mode)``, eager when that is None); ``stop_after`` ends it
    after that many tokens."""
    from transformers import GenerationConfig, StoppingCriteriaList

    compile_config = compile_config_for(model, compile_mode)
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           cache_implementation="static", pad_token_id=0, eos_token_id=None,
                           disable_compile=compile_config is None, compile_config=compile_config)
    stop = StoppingCriteriaList([_StopAfter(input_ids.shape[1], stop_after)]) if stop_after else None
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
                          stopping_criteria=stop)


def time_generate(model: nn.Module, name: str, variant: str, batch: int, prompt_len: int, new_tokens: int,
                  compile_mode: str | None = MODEL_DEFAULT, seed: int = 0,
                  stop_check: str = "model-default") -> GenerateResult:
    """Tokens/s of ``generate`` (static cache; decode compiled by HF with ``compile_config_for(model,
    compile_mode)``) after a warm-up run, with the stop check ``stop_check`` (``StopCheckMode``)."""
    config = compile_config_for(model, compile_mode)
    result = GenerateResult(name, variant, batch, prompt_len, new_tokens,
                            extra={"compile_mode": compile_mode,
                                   "compile_config": None if config is None else _json_safe(config.to_dict())})
    stops = StopCheckMode(stop_check)
    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, prompt_len), generator=gen).to(device)
    try:
        with stops:
            _timed_runs(model, input_ids, new_tokens, compile_mode, result)
        result.extra["stop_check"] = "deferred" if stops.deferred else "per-step"
        result.extra["stop_check_setting"] = stop_check
    except torch.cuda.OutOfMemoryError as exc:
        result.error = f"out of memory: {str(exc).splitlines()[0]}"
    except Exception as exc:  # a benchmark row records its failure and the run goes on
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _timed_runs(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, compile_mode: str | None,
                result: GenerateResult) -> None:
    """Warm-up (compilation, graph capture), a one-token run (TTFT), then the timed run; fills ``result``."""
    batch, prompt_len = input_ids.shape
    torch.cuda.synchronize()
    run_generate(model, input_ids, new_tokens, compile_mode)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    run_generate(model, input_ids, 1, compile_mode)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = run_generate(model, input_ids, new_tokens, compile_mode)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    produced = (out.shape[1] - prompt_len) * batch
    result.tokens_per_s = produced / total
    result.decode_tokens_per_s = batch * (new_tokens - 1) / max(total - ttft, 1e-9)
    result.ttft_ms = ttft * 1e3
    result.peak_mem_gb = torch.cuda.max_memory_allocated() / 2**30


def graph_replay_us(record: Callable[[], None], calls: int, replays: int = 10) -> float:
    """Median µs per call over CUDA-graph replays of `record()`, which issues `calls` calls (run once on a side stream
    first, as capture needs warmed-up kernels). Needs a CUDA GPU."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        record()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        record()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(config, kv4: bool) -> int:
    """KV cache bytes per token of one sequence (all layers) for an HF ``config``: 16-bit K and V take 2*D bytes a
    head each, KV4 D/2 + 4 (packed values + float16 scale and min)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_head = 2 * (head_dim // 2 + 4 if kv4 else 2 * head_dim)
    return config.num_hidden_layers * config.num_key_value_heads * per_head


def largest_batch(config, kv4: bool, weights: int, seq_len: int, memory_bytes: int,
                  activation_reserve: float = 0.1) -> int:
    """Largest batch whose weights + KV cache fit ``memory_bytes`` with a fraction kept for activations."""
    free = memory_bytes * (1 - activation_reserve) - weights
    return max(0, int(free // (kv_bytes_per_token(config, kv4) * seq_len)))


def search_largest(fits: Callable[[int], bool], upper: int, rel_tol: float = 0.03) -> int:
    """Largest n in [0, upper] with ``fits(n)``, assuming fits is monotone (True up to a threshold, then False).

    Bisection stops once the bracket is within ``rel_tol`` of its lower end, so a probe count of about
    log2(1 / rel_tol) + log2(upper / answer) suffices; returns 0 when even n = 1 does not fit.
    """
    lo, hi = 0, upper + 1  # fits(lo) is assumed, fits(hi) is not
    if upper >= 1 and fits(upper):
        return upper
    while hi - lo > max(1, int(lo * rel_tol)):
        mid = (lo + hi) // 2 if lo else max(1, hi // 2)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def fits_in_memory(model: nn.Module, batch: int, prompt_len: int, new_tokens: int) -> bool:
    """Whether ``generate`` at this batch fits the GPU: the static cache is allocated for prompt + new tokens, the
    whole prompt is prefilled at once (as HF does) and two decode steps run (eager), then generation stops."""
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device=model.device)
    try:
        run_generate(model, ids, new_tokens, None, stop_after=2)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del ids
        gc.collect()
        torch.cuda.empty_cache()


def measure_largest_batch(model: nn.Module, prompt_len: int, new_tokens: int, upper: int) -> int:
    """Largest batch for which ``fits_in_memory`` holds (bisection up to ``upper``, within 3%)."""
    return search_largest(lambda b: fits_in_memory(model, b, prompt_len, new_tokens), upper)


def run_e2e(shapes=("llama3-8b",), variants=("bf16", "qoq-g128", "qoq-channel"), batches=(1, 16, 64, 256),
            protocols=((128, 256),), json_path: str | None = None, progress: bool = True,
            measure_max_batch: bool = False, time_max_batch: bool = False,
            stop_checks=("model-default",), compile_modes=(MODEL_DEFAULT,)) -> list[dict]:
    """Run every (shape, variant, batch, protocol, stop check) and return (and optionally write) the rows. With
    ``measure_max_batch``, each (shape, variant, protocol) also gets a row (batch = the measured largest batch)
    from ``measure_largest_batch``, searched up to 1.25x the estimate; ``time_max_batch`` also times ``generate``
    there (10% smaller, up to three times, if the compiled run does not fit)."""
    unknown = set(stop_checks) - set(STOP_CHECKS)
    if unknown:
        raise ValueError(f"unknown stop checks {sorted(unknown)}; choose from {STOP_CHECKS}")
    if not compile_modes or None in compile_modes:
        raise ValueError("compile_modes: give one or more torch.compile modes, 'model-default' or 'eager'")
    if time_max_batch and not measure_max_batch:
        raise ValueError("time_max_batch needs measure_max_batch")
    check_variants(variants)
    from tqdm.auto import tqdm

    if not torch.cuda.is_available():
        raise RuntimeError("the end-to-end benchmark needs a CUDA GPU")
    rows: list[dict] = []
    total_mem = torch.cuda.get_device_properties(0).total_memory
    jobs = [(s, v) for s in shapes for v in variants]
    per_model = len(batches) * len(protocols) * len(stop_checks) * len(compile_modes)
    bar = tqdm(total=len(jobs) * per_model, disable=not progress, desc="e2e")
    for shape, variant in jobs:
        try:
            model = build_variant(shape, variant)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(asdict(GenerateResult(shape, variant, 0, 0, 0, error=f"model does not fit: {exc}")))
            bar.update(per_model)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        wbytes = weight_bytes(model)
        for prompt_len, new_tokens in protocols:
            estimate = largest_batch(model.config, variant != "bf16", wbytes, prompt_len + new_tokens, total_mem)
            for batch, stop_check, mode in [(b, c, m) for b in batches for c in stop_checks for m in compile_modes]:
                res = _time_with_fallback(model, shape, variant, batch, prompt_len, new_tokens, stop_check, mode)
                res.extra.update({"weights_gb": wbytes / 2**30, "largest_batch_estimate": estimate})
                rows.append(asdict(res))
                bar.update(1)
                bar.set_postfix_str(f"{shape} {variant} b={batch} {stop_check}: {res.tokens_per_s or res.error}")
                _write_rows(json_path, rows)
            if measure_max_batch:
                bar.set_postfix_str(f"{shape} {variant}: searching the largest batch (estimate {estimate})")
                measured = measure_largest_batch(model, prompt_len, new_tokens, max(1, int(estimate * 1.25)))
                res = GenerateResult(shape, variant, measured, prompt_len, new_tokens)
                batch = measured
                for _ in range(3 if time_max_batch else 0):
                    bar.set_postfix_str(f"{shape} {variant}: timing the largest batch ({batch})")
                    res = _time_with_fallback(model, shape, variant, batch, prompt_len, new_tokens,
                                              stop_checks[0], compile_modes[0])
                    if res.error is None or "out of memory" not in res.error:
                        break
                    batch = max(1, int(batch * 0.9))
                res.extra.update({"measured_largest_batch": measured, "largest_batch_estimate": estimate})
                rows.append(asdict(res))
                _write_rows(json_path, rows)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    bar.close()
    return rows


def _time_with_fallback(model: nn.Module, shape: str, variant: str, batch: int, prompt_len: int, new_tokens: int,
                        stop_check: str, compile_mode: str = MODEL_DEFAULT) -> GenerateResult:
    """``time_generate`` with ``compile_mode``, or plain inductor where graph capture fails (recorded in the row);
    an eager row has no fallback."""
    failed_modes = {}
    for mode in (compile_mode,) if compile_mode == EAGER else (compile_mode, PLAIN_INDUCTOR):
        res = time_generate(model, shape, variant, batch, prompt_len, new_tokens, compile_mode=mode,
                            stop_check=stop_check)
        if res.error is None or "out of memory" in res.error:
            break
        failed_modes[mode] = res.error
        torch._dynamo.reset()
    res.extra["failed_modes"] = failed_modes
    return res


def _write_rows(json_path: str | None, rows: list[dict]) -> None:
    if json_path:  # rewritten after every row, so a run cut by a time limit keeps what it measured
        with open(json_path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)


def format_table(rows: list[dict]) -> str:
    head = "| model | variant | batch | in/out | tok/s | decode tok/s | TTFT ms | peak GB | max batch (est.) |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        def f(v, fmt="{:.0f}"):
            return "-" if v is None else fmt.format(v)
        err = f" ({r['error']})" if r.get("error") else ""
        extra = r.get("extra", {})
        batch = r["batch"]
        if "measured_largest_batch" in extra:
            batch = f"{extra['measured_largest_batch']} (largest that fits, measured)"
            if r["tokens_per_s"] is not None and r["batch"] != extra["measured_largest_batch"]:
                batch += f", timed at {r['batch']}"
        variant = r["variant"] + (" (deferred stop)" if extra.get("stop_check") == "deferred" else "")
        lines.append(f"| {r['model']} | {variant} | {batch} | {r['prompt_len']}/{r['new_tokens']} | "
                     f"{f(r['tokens_per_s'])}{err} | {f(r['decode_tokens_per_s'])} | {f(r['ttft_ms'], '{:.1f}')} | "
                     f"{f(r['peak_mem_gb'], '{:.1f}')} | {r.get('extra', {}).get('largest_batch_estimate', '-')} |")
    return "\n".join(lines)
