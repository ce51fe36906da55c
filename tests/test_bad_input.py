"""The bad-input matrix: every public op (native and Triton) × every argument — dtype, shape,
device, None, NaN/inf/overflowing scalars, aliasing. Each bad call must raise the documented
exception with a message naming the argument, and leave every tensor it was given bitwise
unchanged, version counters included (docs/conventions.md, "Bad input")."""

import pytest
import torch

import kexue_fast
from kernel_params import providers

NAN, INF = float("nan"), float("inf")
META = torch.device("meta")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _snapshot(args: dict):
    """(tensor, its bytes, its version) for every tensor among the arguments (meta: no bytes)."""
    return [
        (t, None if t.device == META else t.detach().clone().contiguous().reshape(-1).view(torch.uint8), t._version)
        for t in _tensors(list(args.values()))
    ]


def check_rejected(op, args: dict, error, words: str) -> None:
    before = _snapshot(args)
    with pytest.raises(error, match=words):
        op(**args)
    for t, saved_bytes, version in before:
        if saved_bytes is not None:
            assert torch.equal(t.detach().contiguous().reshape(-1).view(torch.uint8), saved_bytes), (
                "a rejected call wrote a tensor"
            )
        assert t._version == version, "a rejected call bumped a version counter"


def _case(overrides, error, words, id):
    return pytest.param(overrides, error, words, id=id)


# --- cond_layer_norm and its backward -----------------------------------------------------------


def cln_args():
    return {"x": torch.randn(2, 3, 8), "weight": torch.randn(2, 8), "bias": torch.randn(8), "eps": 1e-5, "rms": False}


CLN_BAD = [
    _case(lambda a: {"x": None}, TypeError, "x must be a Tensor", "x-None"),
    _case(lambda a: {"x": a["x"].int()}, TypeError, "x must be float32", "x-int32"),
    _case(lambda a: {"x": a["x"].bool()}, TypeError, "x must be float32", "x-bool"),
    _case(lambda a: {"x": torch.randn(8)}, ValueError, "x must be at least 2-D", "x-1d"),
    _case(
        lambda a: {"x": torch.randn(2, 3, 8, device=META)}, ValueError, "weight is on cpu but x is on meta", "x-meta"
    ),
    _case(lambda a: {"weight": torch.randn(3, 8)}, ValueError, "weight must have shape", "weight-shape-B"),
    _case(lambda a: {"weight": torch.randn(7)}, ValueError, "weight must have shape", "weight-shape-D"),
    _case(lambda a: {"weight": torch.randn(2, 3, 8, 1)}, ValueError, "weight must have shape", "weight-4d"),
    _case(lambda a: {"weight": a["weight"].double()}, TypeError, "weight must have x's dtype", "weight-f64"),
    _case(lambda a: {"weight": a["weight"].half()}, TypeError, "weight must have x's dtype", "weight-f16"),
    _case(lambda a: {"weight": torch.randn(2, 8, device=META)}, ValueError, "weight is on meta", "weight-meta"),
    _case(lambda a: {"weight": 3}, TypeError, "weight must be Optional\\[Tensor\\]", "weight-int"),
    _case(lambda a: {"bias": torch.randn(2, 7)}, ValueError, "bias must have shape", "bias-shape"),
    _case(lambda a: {"bias": a["bias"].bfloat16()}, TypeError, "bias must have x's dtype", "bias-bf16"),
    _case(lambda a: {"bias": torch.randn(8, device=META)}, ValueError, "bias is on meta", "bias-meta"),
    _case(lambda a: {"eps": -1e-5}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
    _case(lambda a: {"eps": INF}, ValueError, "eps must be a finite number", "eps-inf"),
    _case(lambda a: {"eps": 1e39}, ValueError, "eps=1e\\+39 overflows float32", "eps-overflow"),
    _case(lambda a: {"eps": "small"}, TypeError, "eps must be float", "eps-str"),
    _case(lambda a: {"rms": "yes"}, TypeError, "rms must be bool", "rms-str"),
]


@pytest.mark.parametrize("op", providers("cond_layer_norm"))
@pytest.mark.parametrize("overrides,error,words", CLN_BAD)
def test_cond_layer_norm_rejects(op, overrides, error, words):
    args = cln_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


def cln_backward_args():
    return {"grad_out": torch.randn(2, 3, 8), **cln_args(), "output_mask": [True, True, True]}


CLN_BACKWARD_BAD = [
    _case(lambda a: {"grad_out": None}, TypeError, "grad_out must be a Tensor", "grad_out-None"),
    *[
        _case(
            lambda a, d=dtype: {"grad_out": a["grad_out"].to(d)},
            TypeError,
            "grad_out must have x's dtype",
            f"grad_out-{dtype}",
        )
        for dtype in (torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.float64, torch.int32)
    ],
    _case(lambda a: {"grad_out": torch.randn(2, 3, 7)}, ValueError, "grad_out has shape", "grad_out-shape"),
    _case(
        lambda a: {"grad_out": torch.randn(2, 3, 8, device=META)}, ValueError, "grad_out is on meta", "grad_out-meta"
    ),
    _case(lambda a: {"x": a["x"][..., :7]}, ValueError, "weight must have shape", "x-shape"),
    _case(lambda a: {"weight": a["weight"].double()}, TypeError, "weight must have x's dtype", "weight-f64"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
]


@pytest.mark.parametrize("op", providers("cond_layer_norm_backward"))
@pytest.mark.parametrize("overrides,error,words", CLN_BACKWARD_BAD)
def test_cond_layer_norm_backward_rejects(op, overrides, error, words):
    args = cln_backward_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


# --- ema_update_ --------------------------------------------------------------------------------


def ema_args():
    return {
        "shadow": [torch.randn(3, 5), torch.randn(7)],
        "params": [torch.randn(3, 5), torch.randn(7)],
        "decay": 0.9,
    }


def _first(overrides):
    """Replaces entry 0 of the given lists (entry 1 stays valid, so a write to it would show)."""

    def build(a):
        return {name: [make(a), *a[name][1:]] for name, make in overrides.items()}

    return build


def _u_inside_a_transposed_weight(a):
    """us[0] lies in the memory of weights[0], a non-contiguous view (the op's table points to a
    contiguous copy of it, so only the check of the tensors themselves sees the overlap)."""
    storage = torch.randn(4, 4)
    return {"weights": [storage.t(), a["weights"][1]], "us": [storage[1], a["us"][1]]}


def _param_under_a_strided_shadow_view(a):
    """params[0] is a transposed (non-contiguous) view of memory that shadow[1] occupies."""
    storage = torch.randn(7, 3)
    return {"shadow": [a["shadow"][0], storage.view(21)[:7]], "params": [storage[:5].t(), a["params"][1]]}


def _shared_storage_shadows(a):
    storage = torch.randn(12)
    return {"shadow": [storage[:7].view(7), storage[5:12]], "params": [torch.randn(7), torch.randn(7)]}


EMA_BAD = [
    _case(lambda a: {"shadow": None}, TypeError, "shadow must be List\\[Tensor\\]", "shadow-None"),
    _case(
        lambda a: {"params": [a["params"][0], None]}, TypeError, "params must be List\\[Tensor\\]", "params-None-entry"
    ),
    _case(lambda a: {"params": a["params"][:1]}, ValueError, "shadow has 2 tensors but params has 1", "lengths"),
    _case(_first({"shadow": lambda a: a["shadow"][0].int()}), TypeError, "shadow\\[0\\] is torch.int32", "shadow-int"),
    _case(
        _first({"shadow": lambda a: a["shadow"][0].half()}),
        TypeError,
        "shadow\\[0\\] is torch.float16",
        "shadow-f16-param-f32",
    ),
    _case(
        _first({"params": lambda a: a["params"][0].double()}), TypeError, "params\\[0\\] is torch.float64", "param-f64"
    ),
    _case(_first({"params": lambda a: torch.randn(5, 3)}), ValueError, "shadow\\[0\\] has shape", "param-shape"),
    _case(_first({"params": lambda a: torch.randn(15)}), ValueError, "shadow\\[0\\] has shape", "param-flat"),
    _case(
        _first({"shadow": lambda a: torch.randn(5, 3).t()}),
        ValueError,
        "shadow\\[0\\] must be contiguous",
        "shadow-strided",
    ),
    _case(_first({"shadow": lambda a: torch.randn(3, 5, device=META)}), ValueError, "are on", "shadow-meta"),
    _case(_first({"params": lambda a: torch.randn(3, 5, device=META)}), ValueError, "are on", "param-meta"),
    _case(
        _first({"shadow": lambda a: torch.randn(3, 5, requires_grad=True)}),
        RuntimeError,
        "shadow\\[0\\] requires grad",
        "shadow-grad",
    ),
    _case(
        lambda a: {"shadow": [a["shadow"][1], a["shadow"][1]], "params": [torch.randn(7), torch.randn(7)]},
        ValueError,
        "shadow\\[0\\] and shadow\\[1\\] share memory|shadow\\[1\\] and shadow\\[0\\] share memory",
        "same-shadow-twice",
    ),
    _case(lambda a: {"params": [a["shadow"][0], a["params"][1]]}, ValueError, "share memory", "shadow-is-param"),
    _case(_shared_storage_shadows, ValueError, "share memory", "overlapping-shadows"),
    _case(
        _param_under_a_strided_shadow_view,
        ValueError,
        "params\\[0\\] and shadow\\[1\\] share memory",
        "param-strided-over-shadow",
    ),
    _case(lambda a: {"decay": NAN}, ValueError, "decay must be in \\[0, 1\\], got nan", "decay-nan"),
    _case(lambda a: {"decay": INF}, ValueError, "decay must be in \\[0, 1\\], got inf", "decay-inf"),
    _case(lambda a: {"decay": -0.1}, ValueError, "decay must be in \\[0, 1\\]", "decay-negative"),
    _case(lambda a: {"decay": 1.5}, ValueError, "decay must be in \\[0, 1\\]", "decay-above-1"),
    _case(lambda a: {"decay": "0.9"}, TypeError, "decay must be float", "decay-str"),
]


@pytest.mark.parametrize("op", providers("ema_update_"))
@pytest.mark.parametrize("overrides,error,words", EMA_BAD)
def test_ema_update_rejects(op, overrides, error, words):
    args = ema_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


# --- spectral_norm_power_iter_ and spectral_sigma ---------------------------------------------


def sn_args():
    return {
        "weights": [torch.randn(4, 4), torch.randn(5, 2, 3)],
        "us": [torch.randn(4), torch.randn(5)],
        "vs": [torch.randn(4), torch.randn(6)],
        "n_iters": 1,
        "eps": 1e-12,
    }


SN_BAD_SHARED = [  # bad for both the power iteration and spectral_sigma
    _case(lambda a: {"vs": a["vs"][:1]}, ValueError, "weights, us, vs have 2, 2, 1 entries", "lengths"),
    _case(
        _first({"weights": lambda a: a["weights"][0].int()}), TypeError, "weights\\[0\\] must be float32", "weight-int"
    ),
    _case(
        _first({"weights": lambda a: torch.tensor(1.0)}),
        ValueError,
        "weights\\[0\\] must have at least 1 dim",
        "weight-0d",
    ),
    _case(_first({"weights": lambda a: a["weights"][0].double()}), TypeError, "float64", "weight-f64-mixed"),
    _case(_first({"weights": lambda a: torch.randn(4, 4, device=META)}), ValueError, "are on", "weight-meta"),
    _case(_first({"us": lambda a: torch.randn(5)}), ValueError, "us\\[0\\] must be 1-D with 4 elements", "u-size"),
    _case(_first({"us": lambda a: torch.randn(2, 2)}), ValueError, "us\\[0\\] must be 1-D", "u-2d"),
    _case(_first({"us": lambda a: a["us"][0].double()}), TypeError, "us\\[0\\] must be torch.float32", "u-f64"),
    _case(_first({"us": lambda a: torch.randn(8)[::2]}), ValueError, "us\\[0\\] must be contiguous", "u-strided"),
    _case(_first({"vs": lambda a: a["vs"][0].bfloat16()}), TypeError, "vs\\[0\\] must be torch.float32", "v-bf16"),
    _case(_first({"vs": lambda a: torch.randn(4, device=META)}), ValueError, "are on", "v-meta"),
]

SN_BAD_WRITTEN = [  # bad only where the vectors are written
    _case(
        _first({"us": lambda a: torch.randn(4, requires_grad=True)}), RuntimeError, "us\\[0\\] requires grad", "u-grad"
    ),
    _case(
        _first({"vs": lambda a: torch.randn(4, requires_grad=True)}), RuntimeError, "vs\\[0\\] requires grad", "v-grad"
    ),
    _case(lambda a: {"vs": [a["us"][0], a["vs"][1]]}, ValueError, "share memory", "u-is-v"),
    _case(
        lambda a: {"weights": [a["weights"][0], torch.randn(4, 6)], "us": [a["us"][0], a["us"][0]]},
        ValueError,
        "us\\[0\\] and us\\[1\\] share memory|us\\[1\\] and us\\[0\\] share memory",
        "same-u-twice",
    ),
    _case(_first({"us": lambda a: a["weights"][0][0]}), ValueError, "share memory", "u-inside-weight"),
    _case(
        _u_inside_a_transposed_weight, ValueError, "weights\\[0\\] and us\\[0\\] share memory", "u-in-strided-weight"
    ),
    _case(lambda a: {"n_iters": -1}, ValueError, "n_iters must be an int >= 0", "n_iters-negative"),
    _case(lambda a: {"n_iters": 1.5}, TypeError, "n_iters must be int", "n_iters-float"),
    _case(lambda a: {"eps": -1.0}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
    _case(lambda a: {"eps": INF}, ValueError, "eps must be a finite number", "eps-inf"),
    _case(lambda a: {"eps": 1e39}, ValueError, "overflows float32", "eps-overflow"),
]


@pytest.mark.parametrize("op", providers("spectral_norm_power_iter_"))
@pytest.mark.parametrize("overrides,error,words", SN_BAD_SHARED + SN_BAD_WRITTEN)
def test_spectral_norm_power_iter_rejects(op, overrides, error, words):
    args = sn_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


@pytest.mark.parametrize("overrides,error,words", SN_BAD_SHARED)
def test_spectral_sigma_rejects(overrides, error, words):
    args = sn_args()
    args = {**args, **overrides(args)}
    args.pop("n_iters"), args.pop("eps")
    check_rejected(torch.ops.kexue.spectral_sigma, args, error, words)


def test_spectral_sigma_accepts_shared_vectors():
    """spectral_sigma only reads its vectors: the same u for two weights, or u is v, is fine."""
    w, u = torch.randn(4, 4), torch.randn(4)
    sigmas = torch.ops.kexue.spectral_sigma([w, w], [u, u], [u, u])
    torch.testing.assert_close(sigmas, torch.stack([u @ w @ u] * 2))


# --- philox_normal --------------------------------------------------------------------------------


def philox_args():
    return {"size": [3, 5], "seed": 0, "offset": 0}


PHILOX_BAD = [
    _case(lambda a: {"size": [3, -1]}, ValueError, "size must be non-negative ints", "size-negative"),
    _case(lambda a: {"size": None}, TypeError, "size must be List\\[int\\]", "size-None"),
    _case(lambda a: {"seed": 1.5}, TypeError, "seed must be int", "seed-float"),
    _case(
        lambda a: {"seed": 2**63},
        ValueError,
        "seed=9223372036854775808 does not fit .* two's-complement value seed=-9223372036854775808",
        "seed-2**63",
    ),
    _case(lambda a: {"offset": 2**64 - 1}, ValueError, "two's-complement value offset=-1", "offset-2**64-1"),
    _case(lambda a: {"seed": 2**64}, ValueError, "seed must be an int in \\[-2\\*\\*63, 2\\*\\*63\\)", "seed-2**64"),
    _case(lambda a: {"dtype": torch.int32}, TypeError, "dtype must be float32/float64/float16/bfloat16", "dtype-int"),
    _case(lambda a: {"device": torch.device("xpu")}, RuntimeError, "no kernel for device xpu", "device-xpu"),
]


@pytest.mark.parametrize("op", providers("philox_normal"))
@pytest.mark.parametrize("overrides,error,words", PHILOX_BAD)
def test_philox_normal_rejects(op, overrides, error, words):
    check_rejected(op, {**philox_args(), **overrides(philox_args())}, error, words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
def test_philox_normal_on_cuda_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        torch.ops.kexue.philox_normal([3], 0, 0, None, torch.device("cuda"))


@pytest.mark.parametrize("op", providers("philox_normal"))
def test_philox_normal_on_meta_gives_a_shape(op):
    out = op([2, 3], 0, 0, torch.bfloat16, META)
    assert out.device == META and out.shape == (2, 3) and out.dtype == torch.bfloat16


def test_python_wrappers_take_unsigned_seeds():
    """Seeds and offsets in [2⁶³, 2⁶⁴) go to the raw op as the same 64 bits (two's complement)."""
    torch.testing.assert_close(
        kexue_fast.philox_normal([9], 2**64 - 1, 2**63),
        torch.ops.kexue.philox_normal([9], -1, -(2**63)),
        rtol=0,
        atol=0,
    )
    x = torch.rand(9)
    y = x.clone()
    kexue_fast.langevin_step_(x, x, 0.0, 1.0, 2**63 + 5, 2**64 - 2)
    torch.ops.kexue.langevin_step_(y, y, 0.0, 1.0, -(2**63) + 5, -2)
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="seed must be in \\[-2\\*\\*63, 2\\*\\*64\\)"):
        kexue_fast.philox_normal([3], 2**64)


def test_python_wrappers_reject_none_tensors():
    with pytest.raises(TypeError, match="x must be a Tensor"):
        kexue_fast.cond_layer_norm(None)
    with pytest.raises(TypeError, match="grad must be a Tensor"):
        kexue_fast.langevin_step_(torch.rand(3), None, 0.1, 0.1, 0, 0)


# --- langevin_step_ -------------------------------------------------------------------------------


def langevin_args():
    return {
        "x": torch.rand(3, 4),
        "grad": torch.rand(3, 4),
        "step_size": 0.1,
        "noise_std": 0.01,
        "seed": 0,
        "offset": 0,
    }


def _partly_overlapping(a):
    storage = torch.rand(14)
    return {"x": storage[:12].view(3, 4), "grad": storage[2:14].view(3, 4)}


LANGEVIN_BAD = [
    _case(lambda a: {"x": None}, TypeError, "x must be a Tensor", "x-None"),
    _case(
        lambda a: {"x": a["x"].double(), "grad": a["grad"].double()},
        TypeError,
        "x must be float32, float16 or bfloat16",
        "x-f64",
    ),
    _case(lambda a: {"x": a["x"].int(), "grad": a["grad"].int()}, TypeError, "x must be float32", "x-int"),
    _case(lambda a: {"x": torch.rand(3, 4, requires_grad=True)}, RuntimeError, "x requires grad", "x-grad"),
    _case(lambda a: {"x": torch.rand(1, 4).expand(3, 4)}, ValueError, "x has elements that overlap", "x-expanded"),
    _case(
        lambda a: {"x": torch.rand(20).as_strided((3, 4), (3, 1))},
        ValueError,
        "x has elements that overlap",
        "x-as_strided",
    ),
    _case(lambda a: {"x": torch.rand(3, 4, device=META)}, ValueError, "grad is on cpu but x is on meta", "x-meta"),
    _case(lambda a: {"grad": None}, TypeError, "grad must be a Tensor", "grad-None"),
    _case(lambda a: {"grad": a["grad"].half()}, TypeError, "grad must have x's dtype", "grad-f16"),
    _case(lambda a: {"grad": torch.rand(4, 3)}, ValueError, "grad has shape", "grad-shape"),
    _case(lambda a: {"grad": torch.rand(3, 4, device=META)}, ValueError, "grad is on meta", "grad-meta"),
    _case(_partly_overlapping, ValueError, "x and grad share memory|grad and x share memory", "grad-overlaps-x"),
    _case(lambda a: {"step_size": NAN}, ValueError, "step_size must be a finite number", "step-nan"),
    _case(lambda a: {"step_size": INF}, ValueError, "step_size must be a finite number", "step-inf"),
    _case(lambda a: {"step_size": 1e39}, ValueError, "step_size=1e\\+39 overflows float32", "step-overflow"),
    _case(lambda a: {"noise_std": -0.1}, ValueError, "noise_std must be a finite number >= 0", "noise-negative"),
    _case(lambda a: {"noise_std": NAN}, ValueError, "noise_std must be a finite number", "noise-nan"),
    _case(
        lambda a: {"noise_std": -1e39}, ValueError, "noise_std must be a finite number >= 0", "noise-overflow-negative"
    ),
    _case(lambda a: {"noise_std": 1e39}, ValueError, "noise_std=1e\\+39 overflows float32", "noise-overflow"),
    _case(lambda a: {"grad_clip": -1.0}, ValueError, "grad_clip must be a finite number >= 0", "clip-negative"),
    _case(lambda a: {"grad_clip": NAN}, ValueError, "grad_clip must be a finite number", "clip-nan"),
    _case(lambda a: {"grad_clip": 1e39}, ValueError, "grad_clip=1e\\+39 overflows float32", "clip-overflow"),
    _case(lambda a: {"min": NAN}, ValueError, "min must be a finite number", "min-nan"),
    _case(lambda a: {"max": -INF}, ValueError, "max must be a finite number", "max-inf"),
    _case(lambda a: {"max": 1e39}, ValueError, "max=1e\\+39 overflows float32", "max-overflow"),
    _case(lambda a: {"min": 1.0, "max": 0.0}, ValueError, "min must be <= max", "min-above-max"),
    _case(lambda a: {"seed": 2**63}, ValueError, "two's-complement value seed=-9223372036854775808", "seed-2**63"),
    _case(lambda a: {"offset": "0"}, TypeError, "offset must be int", "offset-str"),
]


@pytest.mark.parametrize("op", providers("langevin_step_"))
@pytest.mark.parametrize("overrides,error,words", LANGEVIN_BAD)
def test_langevin_step_rejects(op, overrides, error, words):
    args = langevin_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


@pytest.mark.parametrize("op", providers("langevin_step_"))
def test_langevin_step_accepts_grad_that_is_x(op):
    """Like PyTorch's elementwise in-place ops, an exact alias is fine (each element is read
    before it is written); only a partial overlap is an error."""
    x = torch.rand(50)
    expected = x - 0.5 * x
    op(x, x, 0.5, 0.0, 0, 0)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)


def test_module_rejects_wrong_condition_width():
    from kexue_fast.nn import ConditionalLayerNorm

    m = ConditionalLayerNorm(8, cond_dim=4)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 8), torch.randn(2, 5))


# --- iresnet_inverse and its backward ------------------------------------------------------------


def iresnet_args():
    return {
        "y": torch.randn(4, 3),
        "weights": [torch.randn(5, 3), torch.randn(3, 5)],
        "biases": [torch.randn(5), torch.randn(3)],
        "activation": "elu",
        "max_iter": 10,
        "atol": 1e-6,
        "rtol": 1e-6,
    }


IRESNET_BAD = [
    _case(lambda a: {"y": None}, TypeError, "y must be a Tensor", "y-None"),
    _case(lambda a: {"y": a["y"].int()}, TypeError, "y must be float32 or float64", "y-int32"),
    _case(lambda a: {"y": a["y"].half()}, TypeError, "y must be float32 or float64", "y-float16"),
    _case(lambda a: {"y": torch.randn(3)}, ValueError, r"y must be 2-D \(B, D\)", "y-1d"),
    _case(lambda a: {"y": torch.randn(4, 0)}, ValueError, "y must have D >= 1", "y-D0"),
    _case(
        lambda a: {"y": torch.randn(4, 3, device=META)}, ValueError, "weights.0. is on cpu but y is on meta", "y-meta"
    ),
    _case(lambda a: {"weights": [], "biases": []}, ValueError, r"same number \(>= 1\) of layers", "no-layers"),
    _case(lambda a: {"biases": a["biases"][:1]}, ValueError, "same number", "biases-short"),
    _case(lambda a: {"weights": [a["weights"][0], None]}, TypeError, r"weights must be List\[Tensor\]", "weight-None"),
    _case(
        lambda a: {"weights": [torch.randn(5, 4), a["weights"][1]]},
        ValueError,
        r"weights\[0\] has shape \(5, 4\) but y has D = 3",
        "first-layer",
    ),
    _case(
        lambda a: {"weights": [a["weights"][0], torch.randn(3, 4)]},
        ValueError,
        r"weights\[1\] has shape \(3, 4\) but weights\[0\] has 5 outputs",
        "chain",
    ),
    _case(
        lambda a: {"weights": [a["weights"][0], torch.randn(2, 5)], "biases": [a["biases"][0], torch.randn(2)]},
        ValueError,
        "last layer .* has 2 outputs but y has D = 3",
        "last-layer",
    ),
    _case(
        lambda a: {"biases": [torch.randn(4), a["biases"][1]]},
        ValueError,
        r"biases\[0\] has shape \(4,\) but weights\[0\] has 5",
        "bias-shape",
    ),
    _case(
        lambda a: {"weights": [a["weights"][0].double(), a["weights"][1]]},
        TypeError,
        r"weights\[0\] must have y's dtype",
        "weight-f64",
    ),
    _case(
        lambda a: {"biases": [a["biases"][0], a["biases"][1].double()]},
        TypeError,
        r"biases\[1\] must have y's dtype",
        "bias-f64",
    ),
    _case(
        lambda a: {"weights": [torch.randn(5, 3, 1), a["weights"][1]]},
        ValueError,
        r"weights\[0\] must be 2-D",
        "weight-3d",
    ),
    _case(lambda a: {"activation": "gelu"}, ValueError, "activation must be one of", "activation-unknown"),
    _case(lambda a: {"max_iter": -1}, ValueError, "max_iter must be an int >= 0", "max_iter-negative"),
    _case(lambda a: {"atol": -1e-6}, ValueError, "atol must be a finite number >= 0", "atol-negative"),
    _case(lambda a: {"rtol": NAN}, ValueError, "rtol must be a finite number >= 0", "rtol-nan"),
    _case(lambda a: {"atol": INF}, ValueError, "atol must be a finite number >= 0", "atol-inf"),
    _case(lambda a: {"rtol": 1e39}, ValueError, "rtol=1e.39 overflows float32", "rtol-overflow"),
]


@pytest.mark.parametrize("op", providers("iresnet_inverse"))
@pytest.mark.parametrize("overrides,error,words", IRESNET_BAD)
def test_iresnet_inverse_rejects(op, overrides, error, words):
    args = iresnet_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


def iresnet_backward_args():
    args = iresnet_args()
    return {"grad_x": torch.randn(4, 3), "x": args.pop("y"), **args}


IRESNET_BACKWARD_BAD = [
    _case(lambda a: {"grad_x": None}, TypeError, "grad_x must be a Tensor", "grad_x-None"),
    _case(lambda a: {"grad_x": a["grad_x"].double()}, TypeError, "grad_x must have x's dtype", "grad_x-f64"),
    _case(lambda a: {"grad_x": torch.randn(4, 2)}, ValueError, "grad_x has shape", "grad_x-shape"),
    _case(
        lambda a: {"x": torch.randn(4, 2)}, ValueError, r"weights\[0\] has shape \(5, 3\) but x has D = 2", "x-shape"
    ),
    _case(lambda a: {"activation": "swish"}, ValueError, "activation must be one of", "activation"),
    _case(lambda a: {"max_iter": -3}, ValueError, "max_iter must be an int >= 0", "max_iter"),
]


@pytest.mark.parametrize("overrides,error,words", IRESNET_BACKWARD_BAD)
def test_iresnet_inverse_backward_rejects(overrides, error, words):
    args = iresnet_backward_args()
    check_rejected(torch.ops.kexue.iresnet_inverse_backward, {**args, **overrides(args)}, error, words)


def test_iresnet_inverse_rejects_a_table_of_another_op():
    from kexue_fast import _C

    table = _C.TensorTable(3, 2, [0, 0, 0], [0, 0, 0], [1, 1], "spectral_norm")
    with pytest.raises(ValueError, match="iresnet_inverse: expected a table of 2 slots"):
        _C.iresnet_inverse_cpu(0, table, 0, 0, 0, 10, 1e-6, 1e-6, 0, 0)
    good = _C.TensorTable(2, 2, [0, 0], [0, 0], [3, 3], "iresnet")
    with pytest.raises(ValueError, match="unknown activation code 9"):
        _C.iresnet_inverse_cpu(0, good, 9, 0, 0, 10, 1e-6, 1e-6, 0, 0)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        _C.iresnet_inverse_cpu(2, good, 0, 0, 0, 10, 1e-6, 1e-6, 0, 0)


# --- iresnet_mlp_logdet and its backward ----------------------------------------------------------
# (the branch's arguments are validated by the same function as iresnet_inverse's, tested above)


def logdet_args():
    args = iresnet_args()
    weights = {"probes": torch.randn(2, 4, 3), "coefficients": torch.ones(3, dtype=torch.float64), "keep": True}
    return {"x": args["y"], "weights": args["weights"], "biases": args["biases"], "activation": "elu", **weights}


LOGDET_BAD = [
    _case(lambda a: {"x": None}, TypeError, "x must be a Tensor", "x-None"),
    _case(lambda a: {"x": a["x"].double()}, TypeError, r"weights\[0\] must have x's dtype", "x-f64"),
    _case(lambda a: {"weights": [torch.randn(5, 2), a["weights"][1]]}, ValueError, "but x has D = 3", "weights"),
    _case(lambda a: {"activation": "gelu"}, ValueError, "activation must be one of", "activation"),
    _case(lambda a: {"probes": None}, TypeError, "probes must be a Tensor", "probes-None"),
    _case(lambda a: {"probes": torch.randn(4, 3)}, ValueError, r"probes must be \(S, B, D\)", "probes-2d"),
    _case(lambda a: {"probes": torch.randn(0, 4, 3)}, ValueError, "S >= 1", "probes-S0"),
    _case(lambda a: {"probes": torch.randn(2, 5, 3)}, ValueError, r"probes must be \(S, B, D\)", "probes-B"),
    _case(lambda a: {"probes": a["probes"].double()}, TypeError, "probes must have x's dtype", "probes-f64"),
    _case(
        lambda a: {"coefficients": torch.tensor([1.0, NAN], dtype=torch.float64)},
        ValueError,
        r"coefficients\[1\] must be a finite",
        "coeff-nan",
    ),
    _case(
        lambda a: {"coefficients": torch.tensor([INF], dtype=torch.float64)},
        ValueError,
        r"coefficients\[0\] must be a finite",
        "coeff-inf",
    ),
    _case(
        lambda a: {"coefficients": torch.tensor([1e39], dtype=torch.float64)},
        ValueError,
        "fits in float32",
        "coeff-overflow",
    ),
    _case(lambda a: {"coefficients": torch.ones(3)}, TypeError, "coefficients must be a 1-D float64", "coeff-f32"),
    _case(lambda a: {"coefficients": torch.ones(1, 3, dtype=torch.float64)}, TypeError, "1-D float64", "coeff-2d"),
    _case(lambda a: {"coefficients": [1.0]}, TypeError, "coefficients", "coeff-list"),
]


@pytest.mark.parametrize("op", providers("iresnet_mlp_logdet"))
@pytest.mark.parametrize("overrides,error,words", LOGDET_BAD)
def test_iresnet_mlp_logdet_rejects(op, overrides, error, words):
    args = logdet_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


def logdet_backward_args():
    args = logdet_args()
    _, _, saved = torch.ops.kexue.iresnet_mlp_logdet(**args)
    del args["coefficients"], args["keep"]
    return {"grad_gx": torch.randn(4, 3), "grad_logdet": torch.randn(4), **args, "saved": saved}


LOGDET_BACKWARD_BAD = [
    _case(lambda a: {"grad_gx": None}, TypeError, "grad_gx must be a Tensor", "grad_gx-None"),
    _case(
        lambda a: {"grad_gx": torch.randn(4, 2)},
        ValueError,
        r"grad_gx must be torch.float32 of shape \(4, 3\)",
        "grad_gx-shape",
    ),
    _case(
        lambda a: {"grad_logdet": torch.randn(4).double()},
        ValueError,
        "grad_logdet must be torch.float32",
        "grad_logdet-f64",
    ),
    _case(lambda a: {"saved": a["saved"][:-1]}, ValueError, "saved must be what the forward kept", "saved-short"),
    _case(lambda a: {"saved": torch.empty(0)}, ValueError, "saved must be what the forward kept", "saved-empty"),
    _case(lambda a: {"probes": torch.randn(3, 4, 3)}, ValueError, "saved must be what the forward kept", "probes-S"),
]


@pytest.mark.parametrize("op", providers("iresnet_mlp_logdet_backward"))
@pytest.mark.parametrize("overrides,error,words", LOGDET_BACKWARD_BAD)
def test_iresnet_mlp_logdet_backward_rejects(op, overrides, error, words):
    args = logdet_backward_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


# --- modulated_batch_norm and the running update ---------------------------------------------------


def mbn_args():
    return {
        "x": torch.randn(4, 3, 5), "weight": torch.randn(4, 3), "bias": torch.randn(3),
        "running_mean": torch.zeros(3), "running_var": torch.ones(3), "training": True, "momentum": 0.1, "eps": 1e-5,
    }  # fmt: skip


MBN_BAD = [
    _case(lambda a: {"x": None}, TypeError, "x must be a Tensor", "x-None"),
    _case(lambda a: {"x": a["x"].int()}, TypeError, "x must be float32", "x-int32"),
    _case(lambda a: {"x": torch.randn(4)}, ValueError, "x must be at least 2-D", "x-1d"),
    _case(
        lambda a: {"x": torch.randn(1, 3), "weight": None}, ValueError, "more than 1 value per channel", "x-one-value"
    ),
    _case(lambda a: {"x": torch.randn(4, 3, 5, device=META)}, ValueError, "is on cpu but x is on meta", "x-meta"),
    _case(lambda a: {"weight": torch.randn(3, 3)}, ValueError, "weight must have shape", "weight-shape"),
    _case(lambda a: {"weight": torch.randn(4, 3, 1)}, ValueError, "weight must have shape", "weight-3d"),
    _case(lambda a: {"weight": a["weight"].double()}, TypeError, "weight must have x's dtype", "weight-f64"),
    _case(lambda a: {"bias": torch.randn(4)}, ValueError, "bias must have shape", "bias-shape"),
    _case(lambda a: {"bias": torch.randn(3, device=META)}, ValueError, "bias is on meta", "bias-meta"),
    _case(lambda a: {"running_var": None}, ValueError, "must be given together", "running_var-None"),
    _case(lambda a: {"running_mean": torch.zeros(4)}, ValueError, "running_mean must have shape", "running_mean-shape"),
    _case(lambda a: {"running_var": torch.ones(3).int()}, TypeError, "running_var must be a float", "running_var-int"),
    _case(
        lambda a: {"running_mean": None, "running_var": None, "training": False},
        ValueError,
        "required when training=False",
        "eval-without-running",
    ),
    _case(lambda a: {"running_var": a["running_mean"]}, ValueError, "share memory", "running-aliased"),
    _case(lambda a: {"momentum": 1.5}, ValueError, "momentum must be in \\[0, 1\\]", "momentum-above-1"),
    _case(lambda a: {"momentum": NAN}, ValueError, "momentum must be a finite number", "momentum-nan"),
    _case(lambda a: {"eps": -1.0}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
    _case(lambda a: {"eps": 1e39}, ValueError, "eps=1e\\+39 overflows float32", "eps-overflow"),
    _case(lambda a: {"training": "yes"}, TypeError, "training must be bool", "training-str"),
]


@pytest.mark.parametrize("op", providers("modulated_batch_norm"))
@pytest.mark.parametrize("overrides,error,words", MBN_BAD)
def test_modulated_batch_norm_rejects(op, overrides, error, words):
    args = mbn_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


def mbn_backward_args():
    x = torch.randn(4, 3, 5)
    _, mean, var = torch.ops.kexue.modulated_batch_norm_forward(x, None, None, None, None, True)
    return {
        "grad_out": torch.randn(4, 3, 5), "x": x, "weight": torch.randn(4, 3), "bias": None, "mean": mean,
        "var": var, "training": True, "eps": 1e-5, "output_mask": [True, True, True],
    }  # fmt: skip


MBN_BACKWARD_BAD = [
    _case(lambda a: {"grad_out": torch.randn(4, 3, 4)}, ValueError, "grad_out has shape", "grad_out-shape"),
    _case(lambda a: {"grad_out": a["grad_out"].double()}, TypeError, "grad_out must have x's dtype", "grad_out-f64"),
    _case(lambda a: {"mean": a["mean"].double()}, ValueError, "mean must be a \\(3,\\) torch.float32", "mean-f64"),
    _case(lambda a: {"var": torch.ones(4)}, ValueError, "var must be a \\(3,\\)", "var-shape"),
    _case(lambda a: {"weight": torch.randn(2, 3)}, ValueError, "weight must have shape", "weight-shape"),
]


@pytest.mark.parametrize("overrides,error,words", MBN_BACKWARD_BAD)
def test_modulated_batch_norm_backward_rejects(overrides, error, words):
    args = mbn_backward_args()
    check_rejected(torch.ops.kexue.modulated_batch_norm_backward, {**args, **overrides(args)}, error, words)


def update_args():
    return {
        "running_mean": torch.zeros(3), "running_var": torch.ones(3), "mean": torch.randn(3),
        "var": torch.rand(3), "count": 10, "momentum": 0.1,
    }  # fmt: skip


UPDATE_BAD = [
    _case(lambda a: {"running_mean": torch.zeros(3, 1)}, ValueError, "running_mean must be a 1-D", "running-2d"),
    _case(lambda a: {"running_var": torch.ones(4)}, ValueError, "running_var must have running_mean's", "shape"),
    _case(lambda a: {"mean": torch.randn(3).half()}, ValueError, "mean must be a float32/float64", "mean-f16"),
    _case(lambda a: {"var": torch.rand(3).double()}, ValueError, "var must have mean's dtype", "var-f64-mean-f32"),
    _case(lambda a: {"count": 1}, ValueError, "count must be an int 0 or >= 2", "count-1"),
    _case(lambda a: {"count": -3}, ValueError, "count must be an int 0 or >= 2", "count-negative"),
    _case(lambda a: {"momentum": -0.1}, ValueError, "momentum must be a finite number >= 0", "momentum-negative"),
    _case(lambda a: {"running_var": a["running_mean"]}, ValueError, "share memory", "aliased"),
    _case(lambda a: {"mean": a["running_mean"]}, ValueError, "share memory", "mean-is-running"),
    _case(
        lambda a: {"running_mean": torch.zeros(3, requires_grad=True)}, RuntimeError, "running_mean", "requires-grad"
    ),
]


@pytest.mark.parametrize("overrides,error,words", UPDATE_BAD)
def test_batch_norm_update_stats_rejects(overrides, error, words):
    args = update_args()
    check_rejected(torch.ops.kexue.batch_norm_update_stats_, {**args, **overrides(args)}, error, words)


# --- cascading_rejection and its backward ----------------------------------------------------------


def cascading_args():
    return {"v": torch.randn(4, 6), "w": torch.randn(3, 6), "eps": 1e-12}


CASCADING_BAD = [
    _case(lambda a: {"v": None}, TypeError, "v must be a Tensor", "v-None"),
    _case(lambda a: {"w": None}, TypeError, "w must be a Tensor", "w-None"),
    _case(lambda a: {"v": a["v"].int()}, TypeError, "v must be float32, float64, float16 or bfloat16", "v-int"),
    _case(lambda a: {"v": a["v"].bool(), "w": a["w"].bool()}, TypeError, "v must be float32", "v-bool"),
    _case(lambda a: {"w": a["w"].double()}, TypeError, "w must have v's dtype torch.float32", "w-f64"),
    _case(lambda a: {"w": a["w"].bfloat16()}, TypeError, "w must have v's dtype", "w-bf16"),
    _case(lambda a: {"v": torch.randn(4, 6, device=META)}, ValueError, "w is on cpu but v is on meta", "v-meta"),
    _case(lambda a: {"w": torch.randn(3, 6, device=META)}, ValueError, "w is on meta but v is on cpu", "w-meta"),
    _case(lambda a: {"v": torch.randn(6)}, ValueError, "v must be 2-D \\(B, d\\)", "v-1d"),
    _case(lambda a: {"v": torch.randn(2, 4, 6)}, ValueError, "v must be 2-D", "v-3d"),
    _case(lambda a: {"w": torch.randn(6)}, ValueError, "w must be 2-D \\(N, d\\)", "w-1d"),
    _case(lambda a: {"w": torch.randn(3, 5)}, ValueError, "w has d = 5 columns but v has d = 6", "d-mismatch"),
    _case(lambda a: {"eps": -1e-12}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
    _case(lambda a: {"eps": INF}, ValueError, "eps must be a finite number", "eps-inf"),
    _case(lambda a: {"eps": 1e39}, ValueError, "eps=1e\\+39 overflows float32", "eps-overflow"),
    _case(lambda a: {"eps": "small"}, TypeError, "eps must be float", "eps-str"),
]


@pytest.mark.parametrize("overrides,error,words", CASCADING_BAD)
def test_cascading_rejection_rejects(overrides, error, words):
    args = cascading_args()
    check_rejected(torch.ops.kexue.cascading_rejection, {**args, **overrides(args)}, error, words)


def cascading_backward_args():
    return {"grad_scores": torch.randn(4, 3), **cascading_args(), "output_mask": [True, True]}


CASCADING_BACKWARD_BAD = [
    _case(lambda a: {"grad_scores": None}, TypeError, "grad_scores must be a Tensor", "grad_scores-None"),
    _case(lambda a: {"grad_scores": a["grad_scores"].double()}, TypeError, "grad_scores must have v's dtype", "g-f64"),
    _case(lambda a: {"grad_scores": torch.randn(4, 2)}, ValueError, "grad_scores must have shape \\(B, N\\)", "g-N"),
    _case(lambda a: {"grad_scores": torch.randn(12)}, ValueError, "grad_scores must have shape", "g-1d"),
    _case(lambda a: {"grad_scores": torch.randn(4, 3, device=META)}, ValueError, "grad_scores is on meta", "g-meta"),
    _case(lambda a: {"w": torch.randn(3, 5)}, ValueError, "w has d = 5 columns but v has d = 6", "d-mismatch"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
    _case(lambda a: {"output_mask": [True]}, ValueError, "output_mask must have 2 entries", "mask-short"),
]


@pytest.mark.parametrize("overrides,error,words", CASCADING_BACKWARD_BAD)
def test_cascading_rejection_backward_rejects(overrides, error, words):
    args = cascading_backward_args()
    check_rejected(torch.ops.kexue.cascading_rejection_backward, {**args, **overrides(args)}, error, words)


# --- self_orthogonality and its backward ----------------------------------------------------------


def so_args():
    return {"y": torch.randn(6, 4), "gamma": 10.0, "lam1": 100.0, "lam2": 1.0, "reduction": "sum", "eps": 1e-12}


SO_BAD = [
    _case(lambda a: {"y": None}, TypeError, "y must be a Tensor", "y-None"),
    _case(lambda a: {"y": a["y"].int()}, TypeError, "y must be float32, float64, float16 or bfloat16", "y-int32"),
    _case(lambda a: {"y": a["y"].bool()}, TypeError, "y must be float32", "y-bool"),
    _case(lambda a: {"y": torch.randn(6)}, ValueError, r"y must be 2-D \(b, k\)", "y-1d"),
    _case(lambda a: {"y": torch.randn(2, 3, 4)}, ValueError, r"y must be 2-D \(b, k\)", "y-3d"),
    _case(lambda a: {"y": torch.tensor(1.0)}, ValueError, r"y must be 2-D", "y-0d"),
    _case(lambda a: {"gamma": NAN}, ValueError, "gamma must be a finite number", "gamma-nan"),
    _case(lambda a: {"gamma": INF}, ValueError, "gamma must be a finite number", "gamma-inf"),
    _case(lambda a: {"gamma": 1e39}, ValueError, "gamma=1e\\+39 overflows float32", "gamma-overflow"),
    _case(lambda a: {"lam1": -INF}, ValueError, "lam1 must be a finite number", "lam1-inf"),
    _case(lambda a: {"lam2": NAN}, ValueError, "lam2 must be a finite number", "lam2-nan"),
    _case(lambda a: {"lam1": "big"}, TypeError, "lam1 must be float", "lam1-str"),
    _case(lambda a: {"reduction": "none"}, ValueError, 'reduction must be "sum" or "mean"', "reduction-none"),
    _case(lambda a: {"reduction": "SUM"}, ValueError, 'reduction must be "sum" or "mean"', "reduction-case"),
    _case(lambda a: {"reduction": None}, TypeError, "reduction must be str", "reduction-None"),
    _case(lambda a: {"eps": -1e-12}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
    _case(lambda a: {"eps": NAN}, ValueError, "eps must be a finite number", "eps-nan"),
    _case(lambda a: {"eps": INF}, ValueError, "eps must be a finite number", "eps-inf"),
]


@pytest.mark.parametrize("op", providers("self_orthogonality"))
@pytest.mark.parametrize("overrides,error,words", SO_BAD)
def test_self_orthogonality_rejects(op, overrides, error, words):
    args = so_args()
    check_rejected(op, {**args, **overrides(args)}, error, words)


def so_backward_args():
    args = so_args()
    _, t, gram = torch.ops.kexue.self_orthogonality_forward(args["y"])
    return {"grad": torch.tensor(1.0), "y": args.pop("y"), "t": t, "gram": gram, **args}


SO_BACKWARD_BAD = [
    _case(lambda a: {"grad": None}, TypeError, "grad must be a Tensor", "grad-None"),
    _case(lambda a: {"grad": torch.ones(1)}, ValueError, "grad must be a 0-d torch.float32 tensor", "grad-1d"),
    _case(lambda a: {"grad": torch.tensor(1.0).double()}, ValueError, "grad must be a 0-d torch.float32", "grad-f64"),
    _case(lambda a: {"grad": torch.tensor(1.0, device=META)}, ValueError, "grad must be a 0-d .* on cpu", "grad-meta"),
    _case(lambda a: {"y": torch.randn(6)}, ValueError, r"y must be 2-D \(b, k\)", "y-1d"),
    _case(lambda a: {"t": torch.randn(6, 5)}, ValueError, "t must be the forward's", "t-shape"),
    _case(lambda a: {"t": a["t"].double()}, ValueError, "t must be the forward's", "t-f64"),
    _case(lambda a: {"gram": torch.randn(6, 6)}, ValueError, "gram must be the forward's", "gram-shape"),
    _case(lambda a: {"reduction": "max"}, ValueError, 'reduction must be "sum" or "mean"', "reduction"),
    _case(lambda a: {"eps": -1.0}, ValueError, "eps must be a finite number >= 0", "eps-negative"),
]


@pytest.mark.parametrize("overrides,error,words", SO_BACKWARD_BAD)
def test_self_orthogonality_backward_rejects(overrides, error, words):
    args = so_backward_args()
    check_rejected(torch.ops.kexue.self_orthogonality_backward, {**args, **overrides(args)}, error, words)
