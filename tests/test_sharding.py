"""Sharded preprocessing and lung masking (issue #15): part k of n of a stage writes its share, a
gather makes the output one pod would have written, byte for byte (variant.json's timing fields
aside), and refuses parts that are missing, repeated, out of order or of another run. In the
pipeline, preprocess_shards > 1 fans both stages out over the parts; 1 compiles today's graph."""

import json
import os
from typing import List

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Input

from neumo import preprocess, stages, synthetic
from tests.conftest import lung_mask_stand_in
from tests.test_pipeline import _compile, _tasks
from tests.test_preprocess import _write_set

PIXELS = 32
CONFIG = dict(pixels=PIXELS, mask=True, acquisition_copies=1, shard_bytes=8 * PIXELS * PIXELS, workers=1)


def _tree(folder, leave_out=()) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), but those named in leave_out."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if name not in leave_out:
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, folder)] = fh.read()
    return out


def _untimed(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in preprocess.TIMING}


# --- preprocess: the library's split and gather ---------------------------------------------------

@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return str(root), _write_set(root)


@pytest.fixture(scope="module")
def variant_parts(image_set, tmp_path_factory):
    """One pod's variant folder and the folders of its 3 parts (same manifest and settings)."""
    root, rows = image_set
    work = tmp_path_factory.mktemp("variant")
    config = preprocess.PreprocessConfig(**CONFIG)
    one = preprocess.prepare_variant(rows, config, str(work / "one"), root, "v1")
    parts = [str(work / f"part{k}") for k in range(3)]
    records = [preprocess.prepare_variant(rows, config, p, root, "v1", part=k, parts=3) for k, p in enumerate(parts)]
    return work, one, parts, records


def test_three_parts_gathered_are_one_pod_byte_for_byte(variant_parts):
    work, one, parts, records = variant_parts
    gathered = preprocess.gather_variant(parts, str(work / "gathered"))
    single, merged = _tree(work / "one", ["variant.json"]), _tree(work / "gathered", ["variant.json"])
    assert len(single) >= 10 and merged == single  # every shard, byte for byte, at the same path
    written = json.loads((work / "gathered" / "variant.json").read_text())
    assert written == gathered and _untimed(gathered) == _untimed(one)
    assert list(gathered) == list(one)  # the same fields in the same order
    # timing: the parts' seconds summed, the images per second they give, the most workers of one part
    assert gathered["seconds"] == round(sum(r["seconds"] for r in records), 2)
    assert gathered["workers"] == max(r["workers"] for r in records) == 1
    # each part wrote only its share, contiguous and balanced by images
    images = [r["images"] for r in records]
    assert sum(images) == sum(one["counts"].values()) + one["counts"]["train"] + one["shifted_images"]
    assert max(images) - min(images) <= 2 * 8
    assert [f for r in records for f in r["files"]] == [f"{fold}/{name}" for fold, names in one["shards"].items()
                                                        for name in names]
    assert not any(os.path.exists(os.path.join(p, "variant.json")) for p in parts)


def test_one_part_is_the_single_pod_path(image_set, tmp_path):
    root, rows = image_set
    info = preprocess.prepare_variant(rows, preprocess.PreprocessConfig(**CONFIG), str(tmp_path), root, "v1",
                                      part=0, parts=1)
    assert (tmp_path / "variant.json").exists() and not (tmp_path / preprocess.PART_RECORD).exists()
    assert set(preprocess.TIMING) <= set(info)


def test_more_parts_than_shards_leaves_some_empty(image_set, tmp_path):
    root, rows = image_set
    config = preprocess.PreprocessConfig(**{**CONFIG, "shard_bytes": 10**9, "acquisition_copies": 0})
    one = preprocess.prepare_variant(rows, config, str(tmp_path / "one"), root)
    n = sum(map(len, one["shards"].values())) + 2
    parts = [str(tmp_path / f"p{k}") for k in range(n)]
    records = [preprocess.prepare_variant(rows, config, p, root, part=k, parts=n) for k, p in enumerate(parts)]
    assert sum(not r["files"] for r in records) >= 2
    preprocess.gather_variant(parts, str(tmp_path / "gathered"))
    assert _tree(tmp_path / "gathered", ["variant.json"]) == _tree(tmp_path / "one", ["variant.json"])
    assert _untimed(json.loads((tmp_path / "gathered" / "variant.json").read_text())) == _untimed(one)


@pytest.fixture(scope="module")
def foreign_parts(image_set, tmp_path_factory):
    """Part 1 of 3 of another CLAHE clip, and part 1 of a 2-part split, of the same images."""
    root, rows = image_set
    work = tmp_path_factory.mktemp("foreign")
    clip = preprocess.PreprocessConfig(**{**CONFIG, "clahe_clip": 20.0})
    preprocess.prepare_variant(rows, clip, str(work / "clip"), root, "v1", part=1, parts=3)
    preprocess.prepare_variant(rows, preprocess.PreprocessConfig(**CONFIG), str(work / "two"), root, "v1",
                               part=1, parts=2)
    return work


@pytest.mark.parametrize("pick, match", [
    (lambda p, f: [p[1], p[0], p[2]], r"parts given in the order \[1, 0, 2\]: give them in order 0..2"),
    (lambda p, f: [p[0], p[2]], r"part\(s\) 1 of 3 missing"),
    (lambda p, f: [p[0], p[1], p[1]], r"part 1 of 3 given twice"),
    (lambda p, f: [p[0], str(f / "clip"), p[2]], r"part 1 \(.*clip\) was made from another manifest or settings"),
    (lambda p, f: [p[0], str(f / "two"), p[2]], r"is part 1 of 2, the first given of 3: parts of different splits"),
    (lambda p, f: [p[0], str(f), p[2]], r"holds no part.json: not a preprocess part"),
    (lambda p, f: [], r"no parts given"),
])
def test_gather_refuses_a_bad_set_of_parts_in_one_line(variant_parts, foreign_parts, tmp_path, pick, match):
    _, _, parts, _ = variant_parts
    with pytest.raises(ValueError, match=match) as err:
        preprocess.gather_variant(pick(parts, foreign_parts), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and str(err.value).startswith("preprocess gather: ")
    assert not (tmp_path / "out" / "variant.json").exists()


@pytest.mark.parametrize("part, parts, match", [(3, 3, "part must be an integer in 0..2"), (0, 0, "parts must be"),
                                                (-1, 2, "part must be"), (True, 2, "part must be")])
def test_a_bad_part_number_is_refused(image_set, tmp_path, part, parts, match):
    root, rows = image_set
    with pytest.raises(ValueError, match=match):
        preprocess.prepare_variant(rows, preprocess.PreprocessConfig(**CONFIG), str(tmp_path), root, part=part,
                                   parts=parts)
    assert not os.listdir(tmp_path)


def test_the_split_is_contiguous_balanced_and_the_same_everywhere():
    plan = [("train", i, [None] * n, []) for i, n in enumerate([16, 16, 16, 16, 16, 8, 16, 16, 4])]
    split = preprocess.split_plan(plan, 3)
    assert [item for part in split for item in part] == plan
    assert [sum(len(item[2]) for item in part) for part in split] == [48, 32, 44]
    assert preprocess.split_plan(plan, 1) == [plan] and preprocess.split_plan([], 2) == [[], []]


# --- masks: the stage in parts and its gather -----------------------------------------------------



@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An ingested synthetic dataset (manifest), a made lung-mask model imported (model), another
    manifest of other images (other), all as stage folders."""
    work = tmp_path_factory.mktemp("masks")
    w = {k: str(work / k) for k in ("data", "masks", "manifest", "model", "other_data", "other")}
    synthetic.write_kaggle(w["data"], {"train": (5, 5), "test": (2, 2)}, size=64, seed=3, masks_uri=w["masks"])
    synthetic.write_kaggle(w["other_data"], {"train": (5, 5), "test": (2, 2)}, size=64, seed=4)
    stages.ingest(dataset_uri=w["data"], masks_uri=w["masks"], out_dir=w["manifest"])
    stages.ingest(dataset_uri=w["other_data"], out_dir=w["other"])
    lung_mask_stand_in(str(work / "made.keras"))
    stages.mask_model(manifest_dir=w["manifest"], out_dir=w["model"], mask_model_uri=str(work / "made.keras"))
    return work, w


@pytest.fixture(scope="module")
def mask_parts(dataset):
    work, w = dataset
    one = stages.mask(manifest_dir=w["manifest"], model_dir=w["model"], out_dir=str(work / "one"), sheet_size=8)
    parts = [str(work / f"mpart{k}") for k in range(3)]
    records = [stages.mask(manifest_dir=w["manifest"], model_dir=w["model"], out_dir=p, sheet_size=8, part=k, parts=3)
               for k, p in enumerate(parts)]
    return one, parts, records


def test_three_mask_parts_gathered_are_one_pod_byte_for_byte(dataset, mask_parts):
    work, w = dataset
    one, parts, records = mask_parts
    assert [r["images"] for r in records] == [4, 5, 5] and one["images"] == 14
    gathered = stages.mask_gather(parts=parts, manifest_dir=w["manifest"], out_dir=str(work / "gathered"))
    single, merged = _tree(work / "one"), _tree(work / "gathered")
    assert {"qa.csv", "contact_sheet.png", "masks.json"} <= set(single)
    assert sum(name.endswith(".png") for name in single) == 14 + 1
    assert merged == single and gathered == one
    assert not any(os.path.exists(os.path.join(p, name)) for p in parts for name in ("qa.csv", "masks.json"))


def test_mask_gather_refuses_a_bad_set_of_parts(dataset, mask_parts, tmp_path):
    _, w = dataset
    _, parts, _ = mask_parts
    cases = [([parts[0], parts[2], parts[1]], r"parts given in the order \[0, 2, 1\]"),
             (parts[:2], r"part\(s\) 2 of 3 missing"),
             (parts, "the parts were made from another manifest than")]
    for i, (given, match) in enumerate(cases):
        manifest = w["other"] if i == 2 else w["manifest"]
        with pytest.raises(ValueError, match=match) as err:
            stages.mask_gather(parts=given, manifest_dir=manifest, out_dir=str(tmp_path / "out"))
        assert "\n" not in str(err.value) and str(err.value).startswith("mask gather: ")
    assert not (tmp_path / "out" / "masks.json").exists()


def test_mask_parts_without_a_model_gather_to_no_masks(dataset, tmp_path):
    _, w = dataset
    model = str(tmp_path / "model")
    stages.mask_model(manifest_dir=w["manifest"], out_dir=model, planned=[{"pixels": 64, "mask": False}])
    one = stages.mask(manifest_dir=w["manifest"], model_dir=model, out_dir=str(tmp_path / "one"))
    parts = [str(tmp_path / f"p{k}") for k in range(2)]
    for k, p in enumerate(parts):
        stages.mask(manifest_dir=w["manifest"], model_dir=model, out_dir=p, part=k, parts=2)
    assert stages.mask_gather(parts=parts, manifest_dir=w["manifest"], out_dir=str(tmp_path / "gathered")) == one
    assert _tree(tmp_path / "gathered") == _tree(tmp_path / "one") != {}


# --- the pipeline ---------------------------------------------------------------------------------

SHARDED = {"mask-part", "mask-gather", "preprocess-parts", "preprocess-part", "preprocess-gather"}


def test_compiled_graph_fans_out_over_parts_only_when_asked(tmp_path):
    one, _ = _compile(tmp_path, "--parallelism", "2")
    three, platform = _compile(tmp_path, "--parallelism", "2", "--set", "preprocess_shards=3")
    base = {name: comp.rsplit("-", 1)[0] if comp.rsplit("-", 1)[-1].isdigit() else comp
            for name, (comp, _) in _tasks(three).items()}
    assert not SHARDED & {c.removeprefix("comp-") for c in one["components"]}
    assert SHARDED <= {c.removeprefix("comp-") for c in three["components"]}
    tasks = _tasks(three)
    assert "mask" not in tasks and "preprocess" not in tasks
    loops = {n: t for n, (_, t) in tasks.items() if n.startswith("for-loop")}
    assert len(loops) - len({n for n, (_, t) in _tasks(one).items() if n.startswith("for-loop")}) == 2
    assert all(t["iteratorPolicy"]["parallelismLimit"] == 2 for t in loops.values())
    mask_loop = next(t for t in loops.values() if t.get("parameterIterator", {}).get("items", {}).get("raw"))
    assert json.loads(mask_loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2]
    # the mask parts stay on GPU nodes like the mask stage; preprocessing and the gathers run on CPU
    executors = three["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, (comp, _) in tasks.items():
        if not name.startswith("for-loop") and base[name] in SHARDED:
            label = three["components"][comp]["executorLabel"]
            on_gpu = "accelerator" in executors[label]["container"].get("resources", {})
            assert on_gpu == (base[name] == "mask-part") == (label in k8s), name
    # the gathers feed what the later steps read
    assert tasks["pretrain"][1]["inputs"]["artifacts"]["data"]["taskOutputArtifact"]["producerTask"] == \
        "preprocess-gather"
    assert tasks["preprocess-gather"][1]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"] \
        .startswith("for-loop")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def keep(data: Input[List[Dataset]], masks: Input[Dataset], out: str):
    """Copy the variants (in loop order) and the masks to `out`, for the test to compare."""
    import shutil

    shutil.copytree(masks.path, f"{out}/masks")
    for i, d in enumerate(data):
        shutil.copytree(d.path, f"{out}/variant-{i}")


def _sharding_pipeline(shards: int):
    """The mask stage and a variant loop of preprocess tasks, wired by pipelines/full.py's own
    helpers, from an imported manifest and lung-mask model."""
    from pipelines import full
    from pipelines.placement import Placement

    c = {**full.CPU_COMPONENTS, **full.GPU_COMPONENTS}

    @dsl.pipeline(name=f"sharding-{shards}")
    def graph(manifest_uri: str, model_uri: str, out: str, clahe_clip: float = 0.0, acquisition_copies: int = 1,
              acquisition: str = "tight"):
        settings = {"clahe_clip": clahe_clip, "acquisition_copies": acquisition_copies, "acquisition": acquisition}

        def given(component, **inputs):
            return component(**settings, **inputs)

        manifest = dsl.importer(artifact_uri=manifest_uri, artifact_class=dsl.Dataset, reimport=False).output
        lungs = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False).output
        masks = full.lung_masks(c, Placement(), shards, 2, manifest=manifest, mask_model=lungs)
        with dsl.ParallelFor([{"pixels": PIXELS, "mask": True}, {"pixels": PIXELS, "mask": False}],
                             parallelism=2) as variant:
            prepared = full.preprocessed(c, given, Placement(), shards, 2, manifest=manifest,
                                         masks=masks.outputs["masks"], variant=variant)
        keep(data=dsl.Collected(prepared.outputs["data"]), masks=masks.outputs["masks"], out=out)

    return graph


@pytest.mark.slow
def test_kfp_local_three_shards_make_the_bytes_of_one(dataset, tmp_path):
    """kfp.local, with the real components and full.py's wiring: preprocess_shards=3 (the mask loop,
    a preprocess loop nested in the variant loop, the gathers) writes what 1 writes."""
    from kfp import local

    _, w = dataset
    for shards in (1, 3):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / f"root{shards}"),
                   raise_on_error=True)
        _sharding_pipeline(shards)(manifest_uri=w["manifest"], model_uri=w["model"], out=str(tmp_path / f"out{shards}"))
    one, three = tmp_path / "out1", tmp_path / "out3"
    assert _tree(three, ["variant.json"]) == _tree(one, ["variant.json"])
    assert sum(name.endswith(".npz") for name in _tree(one)) >= 8
    assert sum(name.endswith(".png") for name in _tree(one / "masks")) == 14 + 1
    for i in range(2):
        a, b = (json.loads((d / f"variant-{i}" / "variant.json").read_text()) for d in (one, three))
        assert _untimed(a) == _untimed(b) and a["mask"] == (i == 0)


def test_the_command_runs_parts_and_gathers_them(dataset, tmp_path, caplog):
    from neumo import cli

    _, w = dataset
    common = ["preprocess", "--manifest", w["manifest"], "--pixels", str(PIXELS), "--workers", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
    for k in range(2):
        assert cli.main([*common, "--part", str(k), "--parts", "2", "--out", str(tmp_path / f"p{k}")]) == 0
    parts = [str(tmp_path / f"p{k}") for k in range(2)]
    assert cli.main(["preprocess-gather", "--out", str(tmp_path / "gathered"), *parts]) == 0
    assert _tree(tmp_path / "gathered", ["variant.json"]) == _tree(tmp_path / "one", ["variant.json"])
    caplog.clear()
    assert cli.main(["preprocess-gather", "--out", str(tmp_path / "again"), parts[1], parts[0]]) == 2
    (err,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert err == "preprocess-gather: preprocess gather: parts given in the order [1, 0]: give them in order 0..1"
