"""A store's failures by kind, and the outage bound. URLs are parsed once: a remote URL without its bucket, an
unknown protocol and a URL a slash short are refused (exit 2), never read as local folders. A permanent failure (no
space, read-only, not a directory, no permission, a 4xx, no such bucket) fails at once and leaves no ``.tmp``; a
transient one (a timeout, a reset, a 5xx, throttling) is retried. No call through a BoundedWriter, and no wait
behind one, outlasts ``max_outage_s`` by more than one short attempt, whatever hangs.

Real faults: a 64 KiB tmpfs (full, then remounted read-only; mounting needs root, skipped otherwise), a regular file
where a directory goes, moto's S3 server, and for a hung mount an in-process fsspec filesystem whose writes block
(a stand-in for an NFS server that stopped answering, without FUSE)."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import threading
import time

import fsspec
import pytest
from botocore.exceptions import ClientError
from fsspec.implementations.local import LocalFileSystem
from s3fs.errors import translate_boto_error

from meanflow.jobs.cluster import record_job
from meanflow.jobs.outcome import TrainingFailed, exit_status
from meanflow.jobs.submit import main as submit
from meanflow.jobs.train import Trainer
from meanflow.platform.background_upload import PeriodicUpload
from meanflow.platform.checkpoint.upload import BoundedWriter, StorageOutage, StoragePermanentError
from meanflow.platform.config import ConfigError, load_config
from meanflow.platform.metrics import MetricsLog
from meanflow.platform.storage import UnusableURL, filesystem, is_permanent, is_transient, join, probe_writable

pytestmark = pytest.mark.timeout(60)
HANG_S = 10.0   # the longest a hung write blocks before the test's own bound gives way


# ------------------------------------------------------------------------------------------------ fixtures
def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"mount {' '.join(args)} failed (needs root): {proc.stderr.strip()}")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that fills after a few writes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def read_only_disk(tiny_disk):
    (tiny_disk / "run").mkdir()
    _mount("-o", "remount,ro", str(tiny_disk))
    return tiny_disk


class HungFileSystem(LocalFileSystem):
    """Local files whose writes wait until ``thawed`` is set (at most HANG_S): a hung mount, in-process."""

    protocol = "hung"
    thawed = threading.Event()
    first_hang: list[float] = []

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            self.first_hang[:] = self.first_hang or [time.monotonic()]
            self.thawed.wait(HANG_S)
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def hung_store(tmp_path):
    fsspec.register_implementation("hung", HungFileSystem, clobber=True)
    HungFileSystem.thawed.clear()
    HungFileSystem.first_hang.clear()
    yield f"hung://{tmp_path}"
    HungFileSystem.thawed.set()   # the abandoned attempts finish


def writer(timeout_s: float = 5.0, max_outage_s: float = 30.0) -> BoundedWriter:
    return BoundedWriter("checkpoint", timeout_s, max_outage_s, backoff_s=0.05)


# ------------------------------------------------------------------------------------------------ URLs
@pytest.mark.parametrize("url, says", [
    ("s3://", "names no bucket or host"),
    ("s3:///run", "names no bucket or host"),
    ("foo://x", "unknown protocol 'foo' (known: "),
    ("s3:/bucket/run", "a slash missing after 's3:'"),
])
def test_a_url_fsspec_would_misread_is_refused_naming_it(url, says):
    with pytest.raises(UnusableURL) as err:
        filesystem(url)
    assert str(err.value).startswith(f"{url}: ") and says in str(err.value)


def test_join_keeps_the_protocol_of_a_url():
    assert join("s3://bucket/", "run", "x") == "s3://bucket/run/x"
    assert join("file:///abs/dir/", "x") == "file:///abs/dir/x"
    assert join("s3://", "x") == "s3:///x"            # not "s3:/x", a local folder; refused as bucketless
    with pytest.raises(UnusableURL, match="names no bucket"):
        filesystem(join("s3://", "x"))


@pytest.mark.parametrize("run_dir", ["s3://", "foo://x"])
def test_a_submission_to_a_bad_url_exits_2_and_writes_nothing(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert submit(["--cluster", "debug", "--config", "toy2d_mf", "--run-dir", run_dir, "run.steps=2",
                   f"cluster.log_dir={tmp_path}/logs"]) == 2
    assert f"error: {run_dir}: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ classification
def client_error(code: str, status: int) -> OSError:
    """What s3fs raises for an S3 answer: botocore's ClientError translated to an OSError (the ClientError its
    cause)."""
    error = ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                        "PutObject")
    return translate_boto_error(error)


ERRORS = {   # name -> (error, permanent)
    "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), True),
    "EDQUOT": (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    "EROFS": (OSError(errno.EROFS, "Read-only file system"), True),
    "EACCES": (PermissionError(errno.EACCES, "Permission denied"), True),
    "ENOTDIR": (NotADirectoryError(errno.ENOTDIR, "Not a directory"), True),
    "s3-NoSuchBucket": (client_error("NoSuchBucket", 404), True),
    "s3-AccessDenied": (client_error("AccessDenied", 403), True),
    "s3-InvalidArgument": (client_error("InvalidArgument", 400), True),
    "timeout": (TimeoutError("no answer within 2s"), False),
    "ECONNRESET": (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
    "EIO": (OSError(errno.EIO, "Input/output error"), False),
    "s3-InternalError": (client_error("InternalError", 500), False),
    "s3-SlowDown": (client_error("SlowDown", 503), False),
    "s3-Throttling": (client_error("Throttling", 400), False),
    "s3-429": (client_error("TooManyRequests", 429), False),
    "s3-RequestTimeout": (client_error("RequestTimeout", 400), False),
}


@pytest.mark.parametrize("name", ERRORS)
def test_errors_are_sorted_into_permanent_and_transient(name):
    err, permanent = ERRORS[name]
    assert is_permanent(err) is permanent
    assert is_transient(err) is not permanent


# ------------------------------------------------------------------------------------------------ permanent failures
def assert_fails_at_once(call, url: str, says: str, w: BoundedWriter) -> None:
    started = time.monotonic()
    with pytest.raises(StoragePermanentError) as err:
        call()
    assert time.monotonic() - started < 2.0 and w.retries == 0   # not one retry: max_outage_s is 30 s here
    assert str(err.value).startswith(f"{url}: ") and says in str(err.value)


def test_a_full_disk_fails_at_once_and_leaves_no_tmp(tiny_disk):
    w, url = writer(), str(tiny_disk / "ckpt" / "model.pt")
    assert_fails_at_once(lambda: w.write(url, bytes(256 * 1024)), url, "No space left on device", w)
    assert list((tiny_disk / "ckpt").iterdir()) == []


def test_a_read_only_target_fails_at_once_and_is_refused_before_submission(read_only_disk, tmp_path, capsys):
    w, url = writer(), str(read_only_disk / "run" / "metrics.jsonl")
    assert_fails_at_once(lambda: w.write(url, b"{}\n"), url, "Read-only file system", w)
    run_dir = read_only_disk / "run"
    assert submit(["--cluster", "debug", "--config", "toy2d_mf", "--run-dir", str(run_dir), "run.steps=2",
                   f"cluster.log_dir={tmp_path}/logs"]) == 2
    assert f"error: {run_dir}: not writable (OSError: [Errno 30] Read-only file system" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
    with pytest.raises(UnusableURL, match=f"{run_dir}/jobs.jsonl: upload failed, not retried: .*Read-only"):
        record_job(str(run_dir), {"event": "submitted"})   # the ledger, with the default 30-minute limit


def test_a_storage_failure_in_a_job_exits_1_and_an_unusable_url_2():
    def raising(err):
        def fn():
            raise err
        return fn

    assert exit_status(raising(StoragePermanentError("s3://b/run: upload failed"))) == (
        1, "failed: s3://b/run: upload failed")
    assert exit_status(raising(UnusableURL("foo://x: unknown protocol"))) == (2, "error: foo://x: unknown protocol")


def test_a_checkpoint_url_that_is_a_file_fails_at_once_and_is_refused_before_submission(tmp_path, capsys):
    (tmp_path / "ckpt").write_text("a file")
    w, url = writer(), str(tmp_path / "ckpt" / "step-00000005" / "model.pt")
    assert_fails_at_once(lambda: w.write(url, b"weights"), url, "Not a directory", w)
    assert submit(["--cluster", "debug", "--config", "toy2d_mf", "--run-dir", str(tmp_path / "run"), "run.steps=2",
                   f"checkpoint.url={tmp_path / 'ckpt'}", f"cluster.log_dir={tmp_path}/logs"]) == 2
    assert f"error: {tmp_path / 'ckpt'}: not writable (NotADirectoryError" in capsys.readouterr().err
    assert not (tmp_path / "run" / "jobs.jsonl").exists() and not (tmp_path / "logs").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any file mode: EACCES needs a non-root run")
def test_a_directory_without_write_permission_fails_at_once(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    w, url = writer(), str(locked / "metrics.jsonl")
    assert_fails_at_once(lambda: w.write(url, b"{}\n"), url, "Permission denied", w)
    with pytest.raises(UnusableURL, match=f"{locked}: not writable"):
        probe_writable(str(locked))


def test_an_object_store_4xx_fails_at_once_and_a_missing_bucket_is_refused(s3_server):
    fs, w = fsspec.filesystem("s3"), writer()
    url = "s3://no-such-bucket-here/run/metrics.jsonl"
    assert_fails_at_once(lambda: w.call(lambda: fs.pipe_file(url, b"{}\n"), url, "upload"), url,
                         "not retried: FileNotFoundError", w)
    with pytest.raises(UnusableURL, match="s3://no-such-bucket-here/run: not writable .*bucket no-such-bucket-here "
                                          "does not exist"):
        probe_writable("s3://no-such-bucket-here/run")


def test_a_probe_leaves_nothing_behind(s3_bucket, tmp_path):
    for url in (str(tmp_path / "run"), f"{s3_bucket}/run"):
        probe_writable(url)
        fs, path = filesystem(url)
        fs.invalidate_cache()
        assert not fs.exists(path) or fs.ls(path) == []


# ------------------------------------------------------------------------------------------------ the outage bound
def test_an_attempt_longer_than_the_outage_limit_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"key 'checkpoint.upload_timeout_s': 300 is longer than "
                                          r"checkpoint.max_outage_s=10"):
        load_config("toy2d_mf", ["checkpoint.max_outage_s=10"])
    load_config("toy2d_mf", ["checkpoint.max_outage_s=10", "checkpoint.upload_timeout_s=10"])
    assert submit(["--cluster", "debug", "--config", "toy2d_mf", "--run-dir", str(tmp_path / "run"),
                   "checkpoint.max_outage_s=10"]) == 2
    assert "checkpoint.upload_timeout_s" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_hung_attempt_never_outlasts_the_outage_limit(hung_store):
    """upload_timeout_s above max_outage_s (a config refuses it; the writer holds the bound whatever it is given)."""
    w, url = writer(timeout_s=30.0, max_outage_s=0.5), join(hung_store, "ckpt", "model.pt")
    started = time.monotonic()
    with pytest.raises(StorageOutage, match=rf"unreachable for \d+s \(> checkpoint.max_outage_s=0.5\) at {url}"):
        w.write(url, b"weights")
    assert time.monotonic() - started < 1.5


def test_past_the_outage_limit_a_call_gets_one_short_attempt(hung_store):
    """A run stopping on an outage still writes its last records: one short attempt, not a new outage's worth."""
    w, url = writer(timeout_s=0.2, max_outage_s=0.6), join(hung_store, "metrics.jsonl")
    with pytest.raises(StorageOutage):
        w.write(join(hung_store, "ckpt", "model.pt"), b"weights")
    started = time.monotonic()
    with pytest.raises(StorageOutage, match=f"at {url}"):
        w.write(url, b"{}\n")
    assert time.monotonic() - started < 0.5


def test_a_flush_behind_a_hung_background_upload_ends_within_the_bound(hung_store):
    w, url = writer(timeout_s=30.0, max_outage_s=0.5), join(hung_store, "metrics.jsonl")
    log = MetricsLog(url, w, flush_every_s=0.01)
    log.write({"step": 1, "loss": 0.5})
    time.sleep(0.1)                                       # the background upload has started, and hangs
    started = time.monotonic()
    with pytest.raises(StorageOutage, match=rf"\(> checkpoint.max_outage_s=0.5\) at {url}"):
        log.flush()
    assert time.monotonic() - started < 1.5
    log.close(raise_errors=False)


def test_a_hung_background_checkpoint_upload_stops_the_run_within_the_bound(hung_store, tmp_path, one_thread):
    ckpt = join(hung_store, "ckpt")
    cfg = load_config("toy2d_mf", [f"run.run_dir={tmp_path / 'run'}", "run.steps=10", "run.log_every=5",
                                   "data.global_batch=16", "engine.jvp_smoke_test=false", "eval.at_end=false",
                                   "checkpoint.every=5", "checkpoint.async_save=true", f"checkpoint.url={ckpt}",
                                   "checkpoint.upload_timeout_s=0.5", "checkpoint.max_outage_s=1"])
    with pytest.raises(TrainingFailed, match=rf"step 10: store unreachable for \d+s \(> checkpoint.max_outage_s=1\) "
                                             rf"at {ckpt}/step-00000005/"):
        Trainer(cfg, stdout=io.StringIO()).run()   # the step-10 save waits for the step-5 upload, stuck
    # the limit, the last attempt, slack for the steps in between and a loaded machine
    assert time.monotonic() - HungFileSystem.first_hang[0] < 1 + 0.5 + 2.0


def test_waits_behind_an_upload_stuck_outside_any_writer_are_bounded():
    release = threading.Event()
    uploads = PeriodicUpload(lambda: release.wait(HANG_S), 0.01, "test-upload", "memory://run/metrics.jsonl",
                             wait_s=0.3)
    uploads.mark_pending()
    time.sleep(0.1)                                       # the background upload has started, and hangs
    started = time.monotonic()
    try:
        with pytest.raises(StorageOutage, match="memory://run/metrics.jsonl: the upload under way has not ended "
                                                "after 0.3s"):
            uploads.flush()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
