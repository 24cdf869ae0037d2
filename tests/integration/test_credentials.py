"""No credential at rest: a run that reads its data and writes its checkpoints through S3 (a real
moto server), with the credentials given as s3fs names them, leaves none of them in any file.

The data store gets ``key``/``secret``/``token``; the checkpoint store gets them nested, as
``client_kwargs.aws_access_key_id``/``aws_secret_access_key``. After training, a resume, an
export and an evaluation, every file under the test's directory (run dir, checkpoint staging,
mlruns, export, eval output), every object in the bucket (the uploaded checkpoints, read as
bytes) and every line the commands printed is searched for each secret value.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import s3fs
import yaml

from avts_dist.config import load_config, restore_secrets, save_config
from avts_dist.secrets import REDACTED, redact, redact_storage_options
from avts_dist.storage import StorageError, get_fs
from tests.fixtures.in_process import avts

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "pretrain" / "quickstart.yaml"

# Values nobody would write by accident: each must appear nowhere.
KEY = "AKIAAVTSDATAKEY00042"
SECRET = "avts-data-secret-4f1c9e27b8"
TOKEN = "avts-session-token-77d0c3aa"
CK_KEY = "AKIAAVTSCKPTKEY00043"
CK_SECRET = "avts-ckpt-secret-a9b2e6d104"
ALL_SECRETS = (KEY, SECRET, TOKEN, CK_KEY, CK_SECRET)


# ---- redaction by allowlist (no processes) ----


def test_only_allowlisted_option_values_survive():
    options = {
        "key": KEY,
        "secret": SECRET,
        "token": TOKEN,
        "anon": False,
        "some_future_option": "opaque",
        "client_kwargs": {
            "endpoint_url": "http://user:pw@minio:9000",
            "region_name": "eu-west-1",
            "aws_access_key_id": CK_KEY,
            "aws_secret_access_key": CK_SECRET,
        },
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3}},
    }
    assert redact_storage_options(options) == {
        "key": REDACTED,
        "secret": REDACTED,
        "token": REDACTED,
        "anon": False,
        "some_future_option": REDACTED,  # unknown: redacted, not trusted
        "client_kwargs": {
            "endpoint_url": f"http://user:{REDACTED}@minio:9000",
            "region_name": "eu-west-1",
            "aws_access_key_id": REDACTED,
            "aws_secret_access_key": REDACTED,
        },
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3}},
    }
    # The same on flattened MLflow params.
    flat = redact(
        {
            "data.storage_options.key": KEY,
            "data.storage_options.client_kwargs.region_name": "eu-west-1",
            "checkpoint.storage_options": json.dumps({"secret": SECRET}),
            "data.fps": 8.0,
        }
    )
    assert flat == {
        "data.storage_options.key": REDACTED,
        "data.storage_options.client_kwargs.region_name": "eu-west-1",
        "checkpoint.storage_options": json.dumps({"secret": REDACTED}),
        "data.fps": 8.0,
    }


def test_saved_config_holds_placeholders_and_secrets_come_back_only_from_outside(
    tmp_path, monkeypatch
):
    cfg = load_config(
        None,
        [
            f"data.storage_options={{key: {KEY}, secret: {SECRET}, token: {TOKEN}}}",
            "data.url=s3://bucket/ds",
        ],
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    text = path.read_text()
    assert not any(s in text for s in ALL_SECRETS) and text.count(REDACTED) == 3
    saved = load_config(path)
    assert saved.data.storage_options["key"] == REDACTED
    # No credentials in the environment either: one clear error naming the missing options.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(StorageError, match=r"key, secret, token for s3://bucket/ds hold the"):
        get_fs(saved.data.url, saved.data.storage_options)
    # The user's config again (here: explicit values) wins over the placeholders.
    restore_secrets(saved, {"data.storage_options.key": KEY, "data.storage_options.secret": "x"})
    assert saved.data.storage_options["key"] == KEY
    # With credentials in the environment, the placeholders are dropped and s3fs uses those.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    fs, _ = get_fs("s3://bucket/ds", {"key": REDACTED, "secret": REDACTED, "anon": False})
    assert "key" not in fs.storage_options and "secret" not in fs.storage_options


# ---- a whole run against moto ----


@pytest.fixture(scope="module")
def bucket_corpus(s3_server, synth_corpus):
    from tests.fixtures.s3 import make_bucket

    bucket = make_bucket(s3_server)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.put(synth_corpus, f"{bucket}/ds", recursive=True)
    return bucket


def _avts(cwd: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`avts ARGV` in this interpreter (tests/fixtures/in_process.py): what it prints is
    captured as a process's stdout and stderr would be."""
    return avts(list(argv), cwd=cwd, env=env)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def _leaks(data: bytes) -> list[str]:
    return [s for s in ALL_SECRETS if s.encode() in data]


@pytest.mark.slow
@pytest.mark.s3
def test_no_secret_in_any_file_a_run_writes(tmp_path, s3_server, bucket_corpus, capfd):
    bucket = bucket_corpus
    data_options = {
        "key": KEY,
        "secret": SECRET,
        "token": TOKEN,
        "client_kwargs": {"endpoint_url": s3_server},
    }
    ckpt_options = {
        "client_kwargs": {
            "endpoint_url": s3_server,
            "aws_access_key_id": CK_KEY,
            "aws_secret_access_key": CK_SECRET,
        }
    }
    cfg = tmp_path / "user.yaml"
    cfg.write_text(
        f"base: {QUICKSTART}\n"
        f"run: {{name: creds, dir: {tmp_path / 'run'}}}\n"
        f"data: {{url: 's3://{bucket}/ds', global_batch_size: 4, num_workers: 0,"
        f" storage_options: {json.dumps(data_options)}}}\n"
        f"checkpoint: {{dir: 's3://{bucket}/ckpt', every_steps: 0,"
        f" storage_options: {json.dumps(ckpt_options)}}}\n"
        "train: {max_steps: 2, log_every: 1, val_every_steps: 0, progress: false}\n"
        f"tracking: {{uri: {tmp_path / 'mlruns'}, system_metrics: false}}\n"
        "curriculum: {stages: [{name: easy, negative_mix: {easy: 1.0}}]}\n"
    )
    printed = []
    train = _avts(tmp_path, "train", "--config", str(cfg))
    _ok(train)
    printed.append(train.stdout + train.stderr)
    # The resume takes the credentials from the user's config again: the checkpoint has none.
    resume = _avts(tmp_path, "train", "--config", str(cfg), "resume=auto", "train.max_steps=3")
    _ok(resume)
    printed.append(resume.stdout + resume.stderr)
    assert "resumed from" in resume.stderr
    export = _avts(
        tmp_path,
        "export",
        "--checkpoint",
        f"s3://{bucket}/ckpt",
        "--out",
        str(tmp_path / "export" / "model.pt"),
        "--storage-options",
        json.dumps(ckpt_options),
    )
    _ok(export)
    printed.append(export.stdout + export.stderr)
    # The evaluation reads the run's saved (redacted) config: the data credentials come from
    # the environment (the moto fixture's AWS_* variables), and it says so.
    eval_argv = ["eval", "sync", "--checkpoint", str(tmp_path / "export" / "model.pt")]
    eval_argv += ["--config", str(tmp_path / "run" / "config.yaml")]
    eval_argv += ["--out-dir", str(tmp_path / "eval"), "eval.sync_max_clips=8"]
    evaluation = _avts(tmp_path, *eval_argv)
    _ok(evaluation)
    printed.append(evaluation.stdout + evaluation.stderr)
    assert "were redacted when saved: using the environment's credentials" in evaluation.stderr
    # Without credentials in the environment: one clear line, exit 2.
    bare_env = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    bare = _avts(tmp_path, *eval_argv, env={**bare_env, "HOME": str(tmp_path)})
    assert bare.returncode == 2, bare.stderr[-2000:]
    assert f"key, secret, token for s3://{bucket}/ds hold the placeholder" in bare.stderr
    assert "Traceback" not in bare.stderr
    printed.append(bare.stdout + bare.stderr)

    # The run happened where we think: local files, MLflow, and checkpoints in the bucket.
    run_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_config["data"]["storage_options"]["key"] == REDACTED
    ckpt_client = run_config["checkpoint"]["storage_options"]["client_kwargs"]
    assert ckpt_client == {
        "endpoint_url": s3_server,
        "aws_access_key_id": REDACTED,
        "aws_secret_access_key": REDACTED,
    }
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != cfg]
    assert any(p.name == "mp_rank_00_model_states.pt" for p in files)
    assert any("mlruns" in p.parts for p in files)
    leaks = {str(p.relative_to(tmp_path)): _leaks(p.read_bytes()) for p in files}
    assert not {k: v for k, v in leaks.items() if v}, "secrets written to disk"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    objects = fs.find(f"{bucket}/ckpt")
    assert any(o.endswith("mp_rank_00_model_states.pt") for o in objects)
    remote = {o: _leaks(fs.cat_file(o)) for o in objects}
    assert not {k: v for k, v in remote.items() if v}, "secrets uploaded with the checkpoint"
    printed.append("".join(capfd.readouterr()))  # written to the file descriptors directly
    assert not _leaks("\n".join(printed).encode()), "secrets printed"


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_gets_credentials_from_its_environment_not_a_file(slurm_cluster, tmp_path, capfd):
    """`avts launch` pickles the redacted config into the job folder; the job itself still sees
    the user's credentials (they travel in the job's environment, AVTS_CONFIG_SECRETS)."""
    import hashlib

    from avts_dist.cli import main as avts_main
    from avts_dist.config import SECRETS_ENV

    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"aws_session_token": TOKEN}}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"run: {{name: creds-job, dir: {tmp_path / 'run'}}}\n"
        f"data: {{storage_options: {json.dumps(options)}}}\n"
    )
    argv = ["launch", "pretrain", "--config", str(cfg), "--wait", "--time", "00:05:00"]
    argv += ["--grace-s", "30", "--tasks-per-node", "1", "--dry-run"]
    assert avts_main(argv) == 0  # --dry-run prints the config: redacted too
    printed = capfd.readouterr()
    assert "storage_options" in printed.out and not _leaks((printed.out + printed.err).encode())
    assert avts_main(argv[:-1] + ["--trainer", "tests.fixtures.slurm:credentials_probe"]) == 0
    assert SECRETS_ENV not in os.environ  # set only while submitting
    seen = json.loads((tmp_path / "run" / "storage_options.sha256.json").read_text())
    digest = {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs.aws_session_token": TOKEN,
    }
    assert seen == {k: hashlib.sha256(v.encode()).hexdigest() for k, v in digest.items()}
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in files)
    leaks = {str(p): _leaks(p.read_bytes()) for p in files}
    assert not {k: v for k, v in leaks.items() if v}
