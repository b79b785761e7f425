"""core.resources: sizes as people write them, free memory from /proc/meminfo and cgroup v1/v2
files (written here in the kernel's own format), and what budget a run gets."""
import pytest

from core import resources
from core.errors import ConfigError
from core.resources import GiB, MiB

MEMINFO = """MemTotal:       16303412 kB
MemFree:          512000 kB
MemAvailable:    4194304 kB
Buffers:          102400 kB
"""


@pytest.mark.parametrize("text, n_bytes", [
    ("4GiB", 4 * GiB), ("3G", 3 * GiB), ("3g", 3 * GiB), ("512MiB", 512 * MiB), ("1.5 GiB", int(1.5 * GiB)),
    ("2GB", 2 * 10**9), ("1024", 1024), (2048, 2048),
])
def test_sizes_are_read_as_docker_and_systemd_read_them(text, n_bytes):
    assert resources.parse_size(text) == n_bytes


@pytest.mark.parametrize("text", ["four gigs", "4 GiBs", "", "0", "-1G"])
def test_an_unreadable_size_says_how_to_write_one(text):
    with pytest.raises(ConfigError, match="512MiB|more than 0 bytes"):
        resources.parse_size(text)


def test_sizes_are_written_with_a_unit():
    assert [resources.format_size(n) for n in (12, 800 * 1024, 512 * MiB, int(9.3 * GiB), 20 * GiB)] == [
        "12 B", "800 KiB", "512 MiB", "9.3 GiB", "20 GiB"]


def test_meminfo_available(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert resources.read_meminfo_available(tmp_path / "meminfo") == 4194304 * 1024
    (tmp_path / "old").write_text("MemTotal: 100 kB\nMemFree: 50 kB\n")   # kernels before 3.14
    assert resources.read_meminfo_available(tmp_path / "old") is None
    assert resources.read_meminfo_available(tmp_path / "missing") is None


def test_cgroup_v2_room_counts_reclaimable_cache_as_free(tmp_path):
    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2 * GiB}\ninactive_file {GiB // 2}\n")
    assert resources.read_cgroup_free(tmp_path) == int(1.5 * GiB)
    (tmp_path / "memory.max").write_text("max\n")   # no limit
    assert resources.read_cgroup_free(tmp_path) is None


def test_cgroup_v1_room_and_its_no_limit_number(tmp_path):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    (v1 / "memory.stat").write_text(f"cache 0\ntotal_inactive_file {GiB // 4}\n")
    assert resources.read_cgroup_free(tmp_path) == GiB + GiB // 4
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert resources.read_cgroup_free(tmp_path) is None


def test_free_memory_is_the_smaller_of_the_machine_and_the_cgroup(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)   # 4 GiB available on the machine
    (tmp_path / "memory.max").write_text(f"{2 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{GiB}\n")
    assert resources.free_cpu_memory(tmp_path / "meminfo", tmp_path) == GiB
    assert resources.free_cpu_memory(tmp_path / "none", tmp_path / "none") is None


def test_the_budget_keeps_a_reserve_and_names_what_limits_it():
    budget, words = resources.training_budget(4 * GiB, None, "cpu")
    assert budget == 4 * GiB - resources.SERVER_RESERVE_BYTES and words == "3.0 GiB of memory is free for training now"
    budget, words = resources.training_budget(4 * GiB, GiB, "cpu")
    assert budget == GiB and "allows 1.0 GiB per training run (--max-job-memory)" in words
    budget, words = resources.training_budget(None, None, "cuda")
    assert budget is None and words == ""
    budget, words = resources.training_budget(10 * GiB, None, "cuda")
    assert budget == 9 * GiB and words.endswith("of GPU memory is free for training now")


def test_launch_reads_max_job_memory_and_refuses_a_size_it_cannot_read(capsys):
    import launch
    assert launch.parse_args(["--max-job-memory", "4GiB"]).max_job_memory == 4 * GiB
    assert launch.parse_args([]).max_job_memory is None
    with pytest.raises(SystemExit):
        launch.parse_args(["--max-job-memory", "lots"])
    assert "Could not read 'lots' as a memory size" in capsys.readouterr().err
