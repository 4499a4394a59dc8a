"""The steady host heap of CPU training runs (bagel_jax/host_heap.py)."""

import sys

import pytest

from bagel_jax import host_heap


@pytest.fixture
def cpu_host(monkeypatch):
  monkeypatch.setattr(host_heap, "has_accelerator", lambda: False)
  monkeypatch.setattr(host_heap.platform, "system", lambda: "Linux")
  monkeypatch.setattr(host_heap.platform, "libc_ver", lambda: ("glibc", "2.36"))


def test_it_is_opt_in(cpu_host):
  assert host_heap.wants_steady_heap({"PATH": "/bin", "BAGEL_HOST_HEAP": "steady"})
  assert not host_heap.wants_steady_heap({"PATH": "/bin"})


@pytest.mark.parametrize("environ", [{"MALLOC_ARENA_MAX": "4"}, {"MALLOC_MMAP_MAX_": "0"},
                                     {"BAGEL_HOST_HEAP": "system"}])
def test_user_settings_and_reexecuted_processes_are_left_alone(cpu_host, environ):
  assert not host_heap.wants_steady_heap({"BAGEL_HOST_HEAP": "steady", **environ})


def test_accelerator_hosts_and_other_libcs_are_left_alone(monkeypatch, cpu_host):
  asked = {"BAGEL_HOST_HEAP": "steady"}
  monkeypatch.setattr(host_heap, "has_accelerator", lambda: True)
  assert not host_heap.wants_steady_heap(asked)
  monkeypatch.setattr(host_heap, "has_accelerator", lambda: False)
  monkeypatch.setattr(host_heap.platform, "libc_ver", lambda: ("", ""))
  assert not host_heap.wants_steady_heap(asked)


def test_reexec_keeps_the_command_line_and_adds_the_settings(monkeypatch, cpu_host):
  calls = []
  for k in list(host_heap.os.environ):
    if k.startswith("MALLOC_"):
      monkeypatch.delenv(k)
  monkeypatch.setenv("BAGEL_HOST_HEAP", "steady")
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "dev", "-m", "bagel_jax.train", "--workdir", "w"])
  monkeypatch.setattr(host_heap.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
  host_heap.reexec_with_steady_heap()
  (exe, argv, env), = calls
  assert exe == sys.executable and argv == [sys.executable, "-X", "dev", "-m", "bagel_jax.train", "--workdir", "w"]
  assert {k: env[k] for k in host_heap.STEADY_HEAP} == host_heap.STEADY_HEAP
  monkeypatch.setenv("MALLOC_ARENA_MAX", "1")  # the re-executed process does not loop
  host_heap.reexec_with_steady_heap()
  assert len(calls) == 1
