import pytest
import torch

from ckptavg.errors import OptionError
from ckptavg.nn.models import create_model, list_models

TEST_MODELS = {"tiny_bn", "zero_linear"}  # registered by tests/fakedata.py


@pytest.mark.parametrize("name", [n for n in list_models() if n not in TEST_MODELS])
def test_every_registered_model_runs_forward(name):
    torch.manual_seed(0)
    in_ch = 1 if name == "convnet_bn" else 3
    net = create_model(name, num_classes=7, in_channels=in_ch).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_ch, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_paper_architectures_have_the_paper_sizes():
    count = lambda n: sum(p.numel() for p in create_model(n).parameters())  # noqa: E731
    # PreResNet-164 1.7M, WRN-28-10 36.5M, VGG16 15.2M (CIFAR-10 variants)
    assert 1.6e6 < count("preresnet164") < 1.8e6
    assert 36.0e6 < count("wideresnet28_10") < 36.6e6
    assert 14.9e6 < count("vgg16") < 15.3e6
    blocks = create_model("preresnet110").layer1
    assert len(blocks) == 12 and type(blocks[0]).__name__ == "Bottleneck"


def test_small_inputs_work_for_mnist_sizes():
    for name in ("preresnet20", "vgg16_bn", "convnet_bn"):
        net = create_model(name, num_classes=10, in_channels=1).eval()
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_unknown_model_suggests_close_names():
    with pytest.raises(OptionError, match="did you mean preresnet164"):
        create_model("preresnet146")
    with pytest.raises(OptionError, match="did you mean torchvision:resnet18"):
        create_model("torchvision:resnet81")


def test_torchvision_and_user_factories():
    net = create_model("torchvision:resnet18", num_classes=5, in_channels=3)
    assert net.fc.out_features == 5
    net = create_model("tests.fakedata:tiny_bn", num_classes=3, in_channels=1)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(OptionError, match="cannot import"):
        create_model("nopkg.nomod:f")


def test_a_user_registration_keeps_the_builtins_and_names_are_unique():
    from ckptavg.errors import ModelError
    from ckptavg.nn.models import register_model

    @register_model
    def my_net_for_this_test(num_classes: int = 10, in_channels: int = 1):
        return torch.nn.Linear(in_channels, num_classes)

    assert "preresnet20" in list_models() and "my_net_for_this_test" in list_models()
    create_model("preresnet20", num_classes=10, in_channels=1)

    def my_net_for_this_test(num_classes: int = 10):  # noqa: F811 - the clash is the test
        return torch.nn.Linear(1, num_classes)

    with pytest.raises(ModelError, match="already registered"):
        register_model(my_net_for_this_test)


def test_a_bug_inside_a_user_factory_is_a_traceback_not_a_user_error():
    from ckptavg.errors import USER_CODE

    with pytest.raises(OptionError, match="takes no argument 'depth'; it takes: num_classes"):
        create_model("tests.fakedata:tiny_bn", num_classes=3, in_channels=1, depth=3)
    with pytest.raises(ZeroDivisionError) as e:
        create_model("tests.test_models:broken_factory", num_classes=3)
    assert getattr(e.value, USER_CODE) == "the model factory tests.test_models:broken_factory"


def broken_factory(num_classes: int = 10):
    return 1 / 0


def any_kwargs(**kwargs):
    """A user's factory that takes **kwargs, as timm's do."""
    num_classes = kwargs.pop("num_classes", 4)
    if kwargs.pop("in_channels", 1) != 1 or kwargs:
        raise TypeError(f"unexpected {sorted(kwargs) or 'in_channels'}")
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                               torch.nn.LazyLinear(num_classes))


def required(width, num_classes=4):
    """A user's factory with a required parameter the data set cannot give."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(width),
                               torch.nn.Linear(width, num_classes))


def _classes(net) -> int:
    return [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LazyLinear))][-1] \
        .out_features


HERE = "tests.test_models"
SWEEP = [
    # factory, user kwargs, supplied by the data, the class count built, or the error's words
    ("torchvision:resnet18", {}, {"num_classes": 7, "in_channels": 3}, 7),
    ("torchvision:resnet18", {"num_classes": 5}, {"num_classes": 7, "in_channels": 3}, 5),
    ("torchvision:resnet18", {}, {"num_classes": None, "in_channels": None}, 1000),
    ("torchvision:resnet18", {"bogus": 1}, {}, ("model_kwargs", "bogus")),
    ("torchvision:resnet18", {"in_channels": 1}, {}, ("model_kwargs", "3-channel")),
    ("timm:resnet18", {"in_chans": 1}, {"num_classes": 3, "in_channels": 3}, 3),
    ("timm:resnet18", {"bogus": 1}, {}, ("model_kwargs", "bogus")),
    # a **kwargs factory takes what the user names; nothing inferred is pushed into it
    (f"{HERE}:any_kwargs", {}, {"num_classes": 6, "in_channels": 1}, 4),
    (f"{HERE}:any_kwargs", {}, {"num_classes": None, "in_channels": None}, 4),
    (f"{HERE}:any_kwargs", {"num_classes": 2}, {"num_classes": 6, "in_channels": 1}, 2),
    (f"{HERE}:required", {}, {"num_classes": 6, "in_channels": 1}, ("model_kwargs", "width")),
    (f"{HERE}:required", {"width": 3}, {"num_classes": 6, "in_channels": 1}, 6),
    (f"{HERE}:required", {"width": 3, "depth": 2}, {}, ("model_kwargs", "depth", "width")),
]


@pytest.mark.parametrize("arch,kwargs,supplied,expected", SWEEP)
def test_the_kwargs_space_of_each_kind_of_factory(arch, kwargs, supplied, expected):
    """Issue #35: the user's --model-kwargs win; what the data set tells is passed only when
    known and named by the factory's signature (unknown: the factory's default); a kwarg a
    factory refuses or needs is one line naming --model-kwargs."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    if isinstance(expected, int):
        net = create_model(arch, supplied=supplied, **kwargs)
        if any(isinstance(m, torch.nn.LazyLinear) for m in net.modules()):
            net(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer
        assert _classes(net) == expected
        return
    with pytest.raises(OptionError) as e:
        create_model(arch, supplied=supplied, **kwargs)
    assert e.value.options[0] == expected[0]
    for word in expected[1:]:
        assert word in str(e.value), str(e.value)
