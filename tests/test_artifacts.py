"""Archives, manifests, the registry's decisions and the schema gate's, without Triton or Redis.

The archives are built from the example Python-backend model in backends/python_repository, through the
real `gateway archive` command line where the command's behaviour (exit code, message) is the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from backends.example_archives import EXAMPLES, SOURCE, create_command
from gateway.artifacts import registry
from gateway.artifacts.archive import ArchiveError, verify
from gateway.artifacts.create import Source, create
from gateway.artifacts.gate import Check, judge, reload_checks
from gateway.artifacts.manifest import MANIFEST, build_metadata, read_manifest
from gateway.artifacts.schema import Schema, Tensor, differences
from gateway.routing.config import ConfigError, parse_table
from tests.support import REPO

CREATED = "2026-01-15T00:00:00Z"
WEIGHTS = "model/3/weights.npy"


def source(**changes: object) -> Source:
    base: dict[str, object] = {
        "model_dir": SOURCE,
        "triton_version": 3,
        "model": "fraud-detector",
        "version": "2.1.3",
        "sample_request": REPO / "backends" / "examples" / "sample_request.json",
        "metadata": {"lineage": {"git_commit": "4f9c2ab"}},
        "created": CREATED,
    }
    return Source(**(base | changes))  # type: ignore[arg-type]


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


# -- create: reproducible, never overwriting ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_an_archive_created_twice_is_byte_identical(tmp_path: Path, fmt: str) -> None:
    first = create(source(), tmp_path / f"a.{fmt}", fmt)
    copy = (tmp_path / f"a.{fmt}").read_bytes()
    again = create(source(), tmp_path / f"a.{fmt}", fmt, force=True)
    assert (tmp_path / f"a.{fmt}").read_bytes() == copy
    assert first.digest == again.digest
    # The digest names the content: the same build as a directory has the same digest.
    assert create(source(), tmp_path / "a-dir", "dir").digest == first.digest
    assert create(source(version="2.1.4"), tmp_path / f"b.{fmt}", fmt).digest != first.digest


def test_the_command_line_builds_the_same_bytes_twice(tmp_path: Path) -> None:
    outputs = []
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        done = subprocess.run(create_command(EXAMPLES[0], tmp_path / run), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outputs.append(next((tmp_path / run).iterdir()).read_bytes())
    assert outputs[0] == outputs[1]


def test_routes_yaml_names_the_digests_make_run_builds(tmp_path: Path) -> None:
    routes = yaml.safe_load((REPO / "routes.yaml").read_text())
    named = {vid: v["archive"] for vid, v in routes["models"]["fraud-detector"]["versions"].items()}
    for example in EXAMPLES:
        done = subprocess.run(create_command(example, tmp_path), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        built = done.stdout.strip().rsplit(", ", 1)[1]
        assert named[example.version] == built, f"update routes.yaml: {example.version} builds as {built}"


def test_overwriting_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "fd.zip"
    args = ["archive", "create", str(SOURCE), "--model", "fraud-detector", "--version", "2.1.3"]
    args += ["--triton-version", "3", "--created", CREATED, "-o", str(target)]
    assert gateway(*args).returncode == 0
    target.write_bytes(b"someone else's file")
    refused = gateway(*args)
    assert refused.returncode == 1
    assert "already exists; pass --force" in refused.stderr
    assert target.read_bytes() == b"someone else's file"
    assert gateway(*args, "--force").returncode == 0
    assert verify(target).ok
    # A directory that is not an archive is never replaced, even with --force.
    (tmp_path / "notes").mkdir()
    with pytest.raises(ArchiveError, match="not an archive"):
        create(source(), tmp_path / "notes", "dir", force=True)


def test_the_manifest_holds_schema_files_and_metadata(tmp_path: Path) -> None:
    made = create(source(extras=(REPO / "backends" / "examples" / "requirements.txt",)), tmp_path / "a.zip")
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        names = archive.namelist()
        manifest = read_manifest(archive.read(MANIFEST))
    assert names[0] == MANIFEST and names[1:] == sorted(names[1:])
    assert manifest == made.manifest
    assert (manifest.triton.target, manifest.triton.backend, manifest.triton.max_batch_size) == (
        "fraud_detector/3",
        "python",
        64,
    )
    assert manifest.schema.inputs == (Tensor("INPUT__0", "FP32", (-1, -1)),)
    assert [t.name for t in manifest.schema.outputs] == ["OUTPUT__0", "OUTPUT__1"]
    assert {e.path for e in manifest.files} == {
        "model/config.pbtxt",
        "model/3/model.py",
        WEIGHTS,
        "extra/requirements.txt",
        "extra/sample_request.json",
    }
    assert manifest.sample_request == "extra/sample_request.json"
    assert manifest.created == CREATED and manifest.creator.startswith("model-gateway ")


def test_inspect_shows_the_manifest_with_metadata_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "train"
    data.mkdir()
    (data / "part-0.csv").write_text("a,b\n1,2\n")
    (tmp_path / "meta.yaml").write_text("hyperparameters: {lr: 0.01}\nmetrics: {auc: 0.9}\n")
    target = tmp_path / "fd.tgz"
    made = gateway(
        "archive", "create", str(SOURCE), "--model", "fraud-detector", "--version", "2.1.3",
        "--triton-version", "3", "--format", "tgz", "-o", str(target), "--created", CREATED,
        "--metadata-file", str(tmp_path / "meta.yaml"), "--metadata", "metrics.auc=0.931",
        "--training-data", str(data), "--author", "ana",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    digest = made.stdout.strip().rsplit(", ", 1)[1]
    shown = gateway("archive", "inspect", str(target))
    assert shown.returncode == 0 and shown.stdout.startswith(f"fraud-detector 2.1.3  {digest}")
    assert "INPUT__0 FP32 [-1, -1]" in shown.stdout and WEIGHTS in shown.stdout
    manifest = json.loads(gateway("archive", "inspect", str(target), "--json").stdout)["manifest"]
    metadata = manifest["metadata"]
    assert metadata["metrics"] == {"auc": 0.931} and metadata["hyperparameters"] == {"lr": 0.01}
    assert metadata["author"] == "ana" and metadata["lineage"]["training_data"].startswith("sha256:")
    (data / "part-0.csv").write_text("a,b\n1,3\n")  # other training data, another fingerprint
    again = gateway(
        "archive", "create", str(SOURCE), "--model", "fraud-detector", "--version", "2.1.3",
        "--triton-version", "3", "-o", str(tmp_path / "again.zip"), "--created", CREATED,
        "--training-data", str(data),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    fingerprint = json.loads(gateway("archive", "inspect", str(tmp_path / "again.zip"), "--json").stdout)
    assert (
        fingerprint["manifest"]["metadata"]["lineage"]["training_data"]
        != metadata["lineage"]["training_data"]
    )


def test_metadata_from_files_pairs_and_options() -> None:
    metadata = build_metadata(
        [{"metrics": {"auc": 0.9, "f1": 0.8}, "owner": "risk"}],
        ["metrics.auc=0.931", "hyperparameters.lr=0.01", "note=trained on Q3", "tags=[1, 2]"],
        git_commit="4f9c2ab",
        training_data="sha256:9f2c",
        author="ana",
    )
    assert metadata == {
        "metrics": {"auc": 0.931, "f1": 0.8},
        "owner": "risk",
        "hyperparameters": {"lr": 0.01},
        "note": "trained on Q3",
        "tags": [1, 2],
        "lineage": {"git_commit": "4f9c2ab", "training_data": "sha256:9f2c"},
        "author": "ana",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_metadata([], ["no-equals-sign"])


def test_a_sample_request_for_other_inputs_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "sample.json"
    bad.write_text(json.dumps({"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [1]}]}))
    with pytest.raises(ArchiveError, match="IMAGE"):
        create(source(sample_request=bad), tmp_path / "a.zip")


# -- verify: every digest, naming what differs -------------------------------------------------------


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_one_flipped_byte_in_a_weight_file_fails_verify_naming_it(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    create(source(), good)
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(good) as source_zip, zipfile.ZipFile(tampered, "w") as out:
        for info in source_zip.infolist():
            data = source_zip.read(info)
            out.writestr(info, flip_last_byte(data) if info.filename == WEIGHTS else data)
    assert gateway("archive", "verify", str(good)).returncode == 0
    result = gateway("archive", "verify", str(tampered))
    assert result.returncode == 1
    problems = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert len(problems) == 1 and problems[0].startswith(f"{WEIGHTS}: content differs"), result.stderr

    as_dir = tmp_path / "dir"
    create(source(), as_dir, "dir")
    (as_dir / WEIGHTS).write_bytes(flip_last_byte((as_dir / WEIGHTS).read_bytes()))
    (as_dir / "model" / "3" / "backdoor.py").write_text("import os\n")
    found = verify(as_dir).problems
    assert any(p.startswith(f"{WEIGHTS}: content differs") for p in found)
    assert "model/3/backdoor.py: in the archive but not in the manifest" in found


def test_verify_checks_the_manifest_itself(tmp_path: Path) -> None:
    as_dir = tmp_path / "dir"
    create(source(), as_dir, "dir")
    manifest = json.loads((as_dir / MANIFEST).read_text())
    manifest["schema"]["inputs"][0]["shape"] = [-1, 4]  # the files still match their digests
    (as_dir / MANIFEST).write_text(json.dumps(manifest))
    assert any("schema does not match model/config.pbtxt" in p for p in verify(as_dir).problems)
    manifest["format_version"] = 99
    (as_dir / MANIFEST).write_text(json.dumps(manifest))
    assert "format_version" in verify(as_dir).problems[0]
    shutil.rmtree(as_dir / "model")
    (as_dir / MANIFEST).unlink()
    assert verify(as_dir).problems == ("MANIFEST.json: missing; this is not a gateway archive",)


# -- the schema gate's comparison ------------------------------------------------------------------


def schema(input_shape: tuple[int, ...], dtype: str = "FP32", outputs: int = 2) -> Schema:
    out = (Tensor("OUTPUT__0", "FP32", (-1, 1)), Tensor("OUTPUT__1", "INT32", (-1, 1)))
    return Schema((Tensor("INPUT__0", dtype, input_shape),), out[:outputs])


def test_dynamic_dimensions_are_understood() -> None:
    base = schema((-1, -1))
    assert differences(base, schema((-1, -1)), "2.1.3", "2.2.0") == []
    assert differences(schema((-1, 4)), base, "2.1.3", "2.2.0") == []  # accepts more than before: fine
    narrower = differences(base, schema((-1, 4)), "2.1.3", "2.2.0")
    assert narrower == [
        "input INPUT__0: 2.2.0 takes shape [-1, 4], 2.1.3 takes [-1, -1]; dimension 2 must be 4 for 2.2.0, "
        "so requests that work today would fail"
    ]
    assert "different number of dimensions" in differences(base, schema((-1, -1, 3)), "a", "b")[0]
    assert differences(base, schema((-1, -1), "FP16"), "a", "b") == [
        "input INPUT__0: b takes FP16, a takes FP32"
    ]
    assert differences(base, schema((-1, -1), outputs=1), "a", "b") == [
        "output OUTPUT__1: b does not return it (a does)"
    ]


def test_allow_schema_change_lets_a_difference_through() -> None:
    check = Check("fd", "2.2.0", "2.1.3", "its rollout's baseline")
    refused = judge(check, schema((-1, -1)), schema((-1, 4)), allow=False)
    assert not refused.passes and "allow_schema_change: true on 2.2.0" in refused.message()
    allowed = judge(check, schema((-1, -1)), schema((-1, 4)), allow=True)
    assert allowed.passes and allowed.problems


ROUTES = """\
backends:
  a: {url: http://127.0.0.1:8000}
  b: {url: http://127.0.0.1:8100}
models:
  fd:
    versions:
      2.1.3: {backend: a, target: fraud_detector/3}
      2.2.0: {backend: b, target: fraud_detector/4}
      2.3.0: {backend: b, target: fraud_detector/5}
    split: {SPLIT}
"""


def test_a_reload_is_gated_where_it_gives_a_version_weight_for_the_first_time() -> None:
    serving = parse_table(ROUTES.replace("{SPLIT}", "{2.1.3: 90, 2.2.0: 10, 2.3.0: 0}"))
    live = {"fd": (("2.1.3", 90), ("2.2.0", 10), ("2.3.0", 0))}
    same = parse_table(ROUTES.replace("{SPLIT}", "{2.1.3: 50, 2.2.0: 50, 2.3.0: 0}"))
    assert reload_checks(serving, same, live.__getitem__) == []  # 2.2.0 had weight already
    new = parse_table(ROUTES.replace("{SPLIT}", "{2.1.3: 80, 2.2.0: 10, 2.3.0: 10}"))
    assert reload_checks(serving, new, live.__getitem__) == [
        Check("fd", "2.3.0", "2.1.3", "the version with the most traffic now")
    ]
    rollout = "    rollout: {baseline: 2.2.0, canary: 2.3.0}\n"
    with_rollout = parse_table(ROUTES.replace("{SPLIT}", "{2.1.3: 80, 2.2.0: 10, 2.3.0: 10}") + rollout)
    assert reload_checks(serving, with_rollout, live.__getitem__)[0].baseline == "2.2.0"


# -- the registry's decisions -----------------------------------------------------------------------


DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def record(
    digest: str = DIGEST_A, target: tuple[str, int] = ("fraud_detector", 3)
) -> registry.RegistryRecord:
    return registry.RegistryRecord("fd", "2.1.3", digest, *target, schema((-1, -1)), registered_by="ci")


def test_re_registering_an_id_with_other_content_says_what_it_is_and_what_to_do() -> None:
    assert registry.conflict(record(), record()) is None
    message = registry.conflict(record(), record(DIGEST_B))
    assert message is not None
    assert message.startswith(f"fd 2.1.3 is already {DIGEST_A}")
    assert message.endswith("give the new build a new version id")


def test_routes_contradicting_the_registry_are_reported_at_their_position() -> None:
    text = ROUTES.replace("{SPLIT}", "{2.1.3: 100}").replace(
        "target: fraud_detector/3}", f"target: fraud_detector/3, archive: {DIGEST_B}}}"
    )
    candidate = parse_table(text, "routes.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if DIGEST_B in row)
    column = text.splitlines()[line - 1].index("sha256:") + 1
    issues = registry.contradictions(candidate, {"fd": {"2.1.3": record()}})
    assert [(i.file, i.line, i.column) for i in issues] == [("routes.yaml", line, column)]
    assert f"the registry has fd 2.1.3 as {DIGEST_A}" in issues[0].message
    moved = registry.contradictions(candidate, {"fd": {"2.1.3": record(DIGEST_B, ("fraud_detector", 7))}})
    assert "its registered archive" in moved[0].message and "fraud_detector/7" in moved[0].message
    assert registry.contradictions(candidate, {}) == []  # nothing registered, nothing contradicted


def test_archive_and_allow_schema_change_in_routes_yaml() -> None:
    good = parse_table(
        ROUTES.replace("{SPLIT}", "{2.1.3: 100}").replace(
            "target: fraud_detector/4}",
            f"target: fraud_detector/4, archive: {DIGEST_A}, allow_schema_change: true}}",
        )
    )
    version = good.models["fd"].versions["2.2.0"]
    assert (version.archive, version.allow_schema_change) == (DIGEST_A, True)
    text = ROUTES.replace("{SPLIT}", "{2.1.3: 100}").replace(
        "fraud_detector/4}", "fraud_detector/4, archive: abc}"
    )
    with pytest.raises(ConfigError) as bad:
        parse_table(text)
    (issue,) = bad.value.issues
    assert "archive of version 2.2.0 of fd must be an archive digest" in issue.message
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "archive: abc" in row)
    assert (issue.line, issue.column) == (line, text.splitlines()[line - 1].index("abc") + 1)
