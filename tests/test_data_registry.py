"""The dataset registry as users see it: ``fedsim list``, ``fedsim data info`` and config validation."""

from __future__ import annotations

import inspect

import pytest

from fedsim.build import parameter_defaults
from fedsim.build.checks import fits
from fedsim.cli import main
from fedsim.data import DATASETS
from fedsim.data.sources import SOURCES
from fedsim.models import MODELS
from fedsim.registry import validate_parameters


def test_every_file_dataset_has_a_source_and_a_root_option():
    for name, info in DATASETS.items():
        parameters = inspect.signature(info.loader).parameters
        assert (name in SOURCES) == (not info.offline) == ("root" in parameters), name
        assert inspect.getdoc(info.loader), name
        if not info.offline:
            assert SOURCES[name].homepage in inspect.getdoc(info.loader).replace("\n", " "), name


def test_every_loader_option_is_typed_so_config_validation_checks_it():
    for name, info in DATASETS.items():
        hints = inspect.get_annotations(info.loader, eval_str=True)
        for parameter in inspect.signature(info.loader).parameters:
            assert parameter in hints, f"{name}: {parameter} has no type hint"
        validate_parameters(info.loader, parameter_defaults(info.loader), f"[dataset] ({name})")  # defaults validate


def test_fedsim_list_shows_classes_shape_domains_and_availability(capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert (
        "10 classes, 3x28x28, domains: mnist, digits, mnist-m, synth, texture; default model lenet; offline"
        in lines["digits-domains"]
    )
    assert "10 classes, 1x8x8; default model mlp; offline" in lines["digits"]
    assert (
        "100 classes, 3x32x32; default model lenet; needs local files: fedsim data download cifar100"
        in lines["cifar100"]
    )
    assert (
        "domains: art_painting, cartoon, photo, sketch; default model alexnet; needs local files: see fedsim data info pacs"
        in lines["pacs"]
    )


def test_every_dataset_default_model_fits_its_inputs():
    """The model an experiment without ``[model] name`` gets sees the whole input: no
    convolution or pooling window wider than the map it slides over."""
    for name, info in DATASETS.items():
        assert info.model in MODELS, name
        assert fits(info.model, {}, info.shape, len(info.classes)), f"{name}: {info.model} does not fit {info.shape}"


@pytest.mark.parametrize(
    "name, words",
    [
        ("cifar10", ["c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", "cifar-10-batches-bin"]),
        ("domainnet", ["no checksum", "classes = ('bird'"]),
        ("digits-domains", ["embedded: available offline", "domains: mnist, digits, mnist-m, synth, texture"]),
    ],
)
def test_data_info(name, words, capsys, tmp_path):
    assert main(["data", "info", name, "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out
