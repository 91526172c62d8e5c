"""EvalConfig is the one declaration of the options: what it marks as changing the numbers must reach the identity
that store keys and records derive from, and the CLI builds exactly its fields."""

import dataclasses

import pytest

from ssl_patchbench.cli.evaluate import eval_cmd
from ssl_patchbench.core.distributed import Ranks
from ssl_patchbench.pipeline.config import EvalConfig
from ssl_patchbench.pipeline.context import RunContext
from ssl_patchbench.pipeline.representations import evaluations
from ssl_patchbench.results.records import NUMBER_FIELDS

# Another value of each number-changing field that a CPU run of the tiny model on digits accepts.
OTHER = {
    "patches": ("central", "2"),
    "scale": (0.3, 0.3),
    "ratio": (0.5, 2.0),
    "size": 8,
    "aggregations": ("concat",),
    "space": ("projection",),
    "norm_stats": "imagenet",
    "train_per_class": 3,
    "test_per_class": 2,
    "precision": "bf16",
    "seed": 7,
    "knn_ks": (5,),
    "temperature": 0.5,
    "knn_backend": "faiss",  # exact too, but its ties may fall otherwise: recorded
    "store_dtype": "float32",
}
# Fields whose other values need what this test does not build (another zoo entry or dataset, a ViT, CUDA).
NEEDS_MORE = {"model", "dataset", "mode", "stride", "pool", "last_blocks", "decode"}


def _identities(cfg: EvalConfig) -> list[dict]:
    ctx = RunContext.build(cfg, Ranks(), None)
    return [ctx.identity(*rep) for rep in evaluations(cfg, ctx.model.entry)]


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> EvalConfig:
    return EvalConfig(
        model="tiny_cifar", dataset="digits", checkpoint=str(tiny_checkpoint), patches=("2",), device="cpu"
    )


def test_every_number_changing_field_changes_the_identity(base):
    assert set(OTHER) | NEEDS_MORE == set(base.identity()), "give every number-changing field a case"
    reference = _identities(base)
    assert all(tuple(identity) == NUMBER_FIELDS for identity in reference)
    for name, value in OTHER.items():
        assert _identities(dataclasses.replace(base, **{name: value})) != reference, name


def test_fields_that_only_change_speed_leave_the_identity_alone(base):
    speed = {"max_patches": 7, "chunk_rows": 5, "compile": "off", "download": True}
    assert not set(speed) & set(base.identity())
    assert _identities(dataclasses.replace(base, **speed)) == _identities(base)


def test_the_eval_command_has_one_option_per_config_field():
    names = {p.name for p in eval_cmd.params} - {"nproc", "as_json"}
    assert names == {f.name for f in dataclasses.fields(EvalConfig)}
