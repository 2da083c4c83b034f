"""Shared fixtures."""

import itertools
import os

import pytest
import torch
from s3_server import MotoServer

# The whole SLURM cluster is one shared resource: its tests run one after another on one pytest-xdist worker.
SLURM_CLUSTER_MODULES = {"test_slurm", "test_multinode", "test_run_lease"}
# Whole training runs (marked slow), each a worker unit of its own so that a long file never queues behind one. Named
# here, not found by their mark: xdist's scheduler runs in the controller, which never collects.
SOLO_TESTS = ("tests/test_training.py::test_digits_local_run_samples_are_their_class",
              "tests/test_fidelity.py::test_quick_report_is_written_with_finite_numbers_and_plots",
              "tests/test_dmf.py::test_tiny_dmf_from_a_flow_run_samples_its_classes")
# The longest units start first (xdist hands units out in collection order, and tops a worker up with the next unit
# whenever it has at most two tests left), so no worker idles at the end while another still has a long one.
LONGEST_GROUPS = ("slurm_cluster", SOLO_TESTS[0], "test_training", "test_engines")


def worker_group(nodeid: str) -> str:
    """The worker unit a test belongs to: the test alone for a whole training run, else its file, or the SLURM
    cluster's group. Parametrised solo tests share their function's rank in LONGEST_GROUPS."""
    solo = next((name for name in SOLO_TESTS if nodeid.startswith(name)), None)
    if solo is not None:
        return nodeid
    module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
    return "slurm_cluster" if module in SLURM_CLUSTER_MODULES else module


def _rank(nodeid: str) -> int:
    """Sort key: the LONGEST_GROUPS in order, then the other solo tests, then the rest."""
    key = next((name for name in SOLO_TESTS if nodeid.startswith(name)), worker_group(nodeid))
    if key in LONGEST_GROUPS:
        return LONGEST_GROUPS.index(key)
    return len(LONGEST_GROUPS) + (key not in SOLO_TESTS)


def pytest_xdist_make_scheduler(config, log):
    """A test file runs whole on one worker, so its module fixtures are built once. (xdist's own loadgroup marks
    do not reach its scheduler on pytest 9.2: the test ids it appends the group to are read-only there.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return FileGroups(config, log)


def pytest_collection_modifyitems(items):
    unlisted = [item.nodeid for item in items if item.get_closest_marker("slow")
                and not item.nodeid.startswith(SOLO_TESTS)]
    if unlisted:
        raise pytest.UsageError(f"tests marked slow must be listed in conftest.SOLO_TESTS: {unlisted}")
    items.sort(key=lambda item: _rank(item.nodeid))


def pytest_configure(config):
    """Two workers on two cores: one intra-op thread each, for them and the processes they start (tiny tensors
    gain nothing from a second thread, and two workers × two threads thrash)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (100× slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server for the whole session (later service tests reuse it); its endpoint and test
    credentials are exported to this process and every child, the way a user's environment would carry them."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


_bucket_numbers = itertools.count()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test: ``s3://<name>``."""
    import fsspec

    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """torch-fidelity's inception-v3-compat with random weights, saved to a file. Building it normally downloads the
    real weights (no network here), so its loading is stubbed for this one construction only. The convolutions are
    He-initialised: under the default init the features shrink to ~1e-6 over 90-odd layers, and evaluation refuses
    such near-constant features."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    from meanflow.evaluation.feature_extractors import INCEPTION

    real_from_url, real_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: None
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3(INCEPTION, ["2048", "logits_unbiased"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = real_from_url, real_load
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path, net
