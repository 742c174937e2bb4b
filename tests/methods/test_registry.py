"""The method extension point: options declared once, values checked before any forward pass."""

from __future__ import annotations

import math

import pytest
import torch

import segcam
from head_nets import head_setup
from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR
from segcam.errors import (
    MethodNotSupportedError,
    MethodRegistrationError,
    OptionError,
    SegCamError,
)
from segcam.methods import REGISTRY, register
from segcam.testing import tiny_segnet


class CountingNet(torch.nn.Module):
    """tiny_segnet with a count of forward calls."""

    def __init__(self, spatial_dims=2):
        super().__init__()
        self.net = tiny_segnet(spatial_dims, downsample=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_option_defaults_come_from_the_signature():
    assert dict(REGISTRY["seg-xres-cam"].options) == {"pool_size": 2, "pool": "max"}
    assert dict(REGISTRY["seg-score-cam"].options) == {"batch_size": 32, "max_channels": None}
    assert dict(REGISTRY["seg-hires-grad-cam"].options) == {}


BAD_OPTIONS = [
    ("seg-xres-cam", {"pool_size": 0}, "pool_size must be a positive int"),
    ("seg-xres-cam", {"pool_size": 2.5}, "pool_size must be a positive int"),
    ("seg-xres-cam", {"pool_size": [2, 0]}, "pool_size must be a positive int"),
    ("seg-xres-cam", {"pool_size": "abc"}, "pool_size must be a positive int"),
    ("seg-xres-cam", {"pool": "median"}, "pool must be 'max' or 'mean'"),
    ("seg-xres-cam", {"size": 2}, "has no option 'size'"),
    ("seg-score-cam", {"batch_size": 0}, "batch_size must be a positive int"),
    ("seg-score-cam", {"max_channels": -1}, "max_channels must be a positive int or None"),
    ("seg-score-cam", [("batch_size", 2)], "must be a mapping"),
]


@pytest.mark.parametrize(("method", "options", "pattern"), BAD_OPTIONS)
def test_bad_option_values_are_refused_before_the_forward(method, options, pattern):
    model = CountingNet()
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(OptionError, match=pattern):
        segcam.explain(model, x, segcam.AllPixels(1), "net.body.3", method, method_options=options)
    with pytest.raises(OptionError, match=pattern):
        segcam.explain_methods(
            model, x, segcam.AllPixels(1), "net.body.3", [method], method_options={method: options}
        )
    explainer = segcam.Explainer(model, "net.body.3")
    with pytest.raises(OptionError, match=pattern):
        explainer.explain(segcam.AllPixels(1), method, method_options=options)  # before forward()
    assert model.calls == 0


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"overlap": -0.5}, "overlap must be a number in"),
        ({"overlap": 1.0}, "overlap must be a number in"),
        ({"overlap": math.nan}, "overlap must be a number in"),
        ({"overlap": (0.5, 0.5)}, "overlap must be a number in"),  # 3 axes
        ({"mode": "box"}, "mode must be"),
        ({"sigma_scale": 0}, "sigma_scale must be"),
        ({"sw_batch_size": 0}, "sw_batch_size must be"),
        ({"method": "seg-eigen-cam"}, "gradient methods only"),
        ({"method_options": {"pool_size": 0}, "method": "seg-xres-cam"}, "pool_size"),
        ({"normalize": "l2"}, "normalize must be"),
    ],
)
def test_bad_sliding_window_options_are_refused_before_the_forward(options, pattern):
    model = CountingNet(3)
    with pytest.raises(SegCamError, match=pattern):
        segcam.explain_sliding_window(
            model, torch.rand(1, 1, 4, 8, 8), segcam.AllPixels(1), "net.body.3", 4, **options
        )
    assert model.calls == 0


def test_per_axis_overlap_is_accepted():
    model = tiny_segnet(3, downsample=False)
    x = torch.rand(1, 1, 4, 8, 8)
    expl = segcam.explain_sliding_window(
        model, x, segcam.AllPixels(1), "body.3", (4, 4, 4), overlap=(0.0, 0.5, 0.0)
    )
    assert expl.info["sliding_window"]["overlap"] == [0.0, 0.5, 0.0]
    assert expl.info["sliding_window"]["windows"] == 1 * 3 * 2


def test_gradient_free_sliding_window_rule_lives_in_the_registry():
    assert [m.name for m in REGISTRY.values() if not m.supports_sliding_window] == [
        "seg-eigen-cam",
        "seg-score-cam",
    ]
    with pytest.raises(MethodNotSupportedError, match="gradient methods only"):
        REGISTRY["seg-score-cam"].require_sliding_window()
    REGISTRY["seg-grad-cam"].require_sliding_window()


def test_cli_bad_option_value_is_one_line_and_loads_no_model(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(
        "segcam.apps.specs.load_model", lambda *args, **kwargs: built.append(1) or None
    )
    status = main(
        [
            "explain",
            str(tmp_path / "any.npy"),
            "--model",
            "segcam.apps.demo.models:build_demo_model",
            "--weights",
            str(WEIGHTS_DIR / "synthetic_unet2d.pt"),
            "--target",
            "all:1",
            "--layer",
            "model.1.submodule.2",
            "--method",
            "seg-xres-cam",
            "--method-option",
            "seg-xres-cam:pool_size=0",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and built == []
    assert err.count("\n") == 1 and "pool_size must be a positive int" in err
    assert not (tmp_path / "out").exists()


def test_registration_errors():
    with pytest.raises(MethodRegistrationError, match="already registered"):
        register("seg-grad-cam", summary="", reference="")(lambda a, g: a)
    with pytest.raises(MethodRegistrationError, match="needs a default"):
        register("no-default", summary="", reference="")(lambda a, g, power: a)
    with pytest.raises(MethodRegistrationError, match="keyword parameter"):
        register("var-kw", summary="", reference="")(lambda a, g, **kw: a)
    with pytest.raises(MethodRegistrationError, match="kind must be"):
        register("bad-kind", summary="", reference="", kind="other")  # type: ignore[call-overload]
    assert not {"no-default", "var-kw", "bad-kind"} & set(REGISTRY)
    for name in ("../evil", "a/b", "cam:x", "", " cam", "-cam", "x" * 65, 3):
        with pytest.raises(MethodRegistrationError, match="letters, digits"):
            register(name, summary="", reference="")  # type: ignore[arg-type]
    assert not {"../evil", "a/b", "cam:x"} & set(REGISTRY)


def test_a_registered_method_with_a_validator(monkeypatch):
    registry = dict(REGISTRY)  # leave the registry as it was
    monkeypatch.setattr("segcam.methods.registry.REGISTRY", registry)
    monkeypatch.setattr("segcam.methods.REGISTRY", registry)
    from segcam import methods

    def check(options):
        if options["power"] not in (1, 2):
            raise OptionError(f"power-cam: power must be 1 or 2; got {options['power']!r}")

    @methods.register("power-cam", summary="G^p * A", reference="a test", validate=check)
    def power_cam(activation, gradient, *, power: int = 1):
        return (gradient**power * activation).sum(dim=1)

    assert dict(methods.REGISTRY["power-cam"].options) == {"power": 1}
    model = tiny_segnet(2)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    first = segcam.explain(model, x, segcam.AllPixels(1), "body.3", "power-cam", relu=False)
    hires = segcam.explain(model, x, segcam.AllPixels(1), "body.3", relu=False)
    torch.testing.assert_close(first.maps, hires.maps)  # power 1 is Seg-HiRes-Grad CAM
    with pytest.raises(OptionError, match="power must be 1 or 2"):
        segcam.explain(
            model, x, segcam.AllPixels(1), "body.3", "power-cam", method_options={"power": 3}
        )


def test_cli_and_registry_list_the_new_methods(capsys):
    from segcam.apps.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "seg-layer-cam" in out and "seg-xgrad-cam" in out and "BMVC 2020" in out


def test_method_options_are_checked():
    net, x, mask, _ = head_setup(0, 2)
    with pytest.raises(ValueError, match=r"no option 'pool_sise'.*pool_size, pool"):
        segcam.explain(
            net, x, segcam.Mask(1, mask), "body", "seg-xres-cam", method_options={"pool_sise": 2}
        )
    with pytest.raises(ValueError, match="pool must be 'max' or 'mean'"):
        segcam.explain(
            net, x, segcam.Mask(1, mask), "body", "seg-xres-cam", method_options={"pool": "median"}
        )
    with pytest.raises(ValueError, match="pool_size must be"):
        segcam.explain(
            net,
            x,
            segcam.Mask(1, mask),
            "body",
            "seg-xres-cam",
            method_options={"pool_size": (2, 2, 2)},
        )
    with pytest.raises(ValueError, match=r"has no option 'batch_size'.*none"):
        segcam.explain(
            net,
            x,
            segcam.Mask(1, mask),
            "body",
            "seg-hires-grad-cam",
            method_options={"batch_size": 2},
        )


def test_methods_in_the_registry_have_kinds_and_options():
    from segcam.methods import REGISTRY

    kinds = {name: method.kind for name, method in REGISTRY.items()}
    assert kinds["seg-eigen-cam"] == "activation" and kinds["seg-score-cam"] == "model"
    assert {n for n, k in kinds.items() if k == "gradient"} >= {
        "seg-hires-grad-cam",
        "seg-grad-cam",
        "seg-layer-cam",
        "seg-xgrad-cam",
        "seg-grad-cam++",
        "seg-xres-cam",
    }
    assert REGISTRY["seg-xres-cam"].options == {"pool_size": 2, "pool": "max"}
    assert REGISTRY["seg-score-cam"].options == {"batch_size": 32, "max_channels": None}
