"""utils.files: the lock, the sha256 and the completeness test the model conversions share."""

from __future__ import annotations

import hashlib
import threading
import time

from adainfer_hf.utils.files import file_lock, is_converted_dir, sha256_file


def test_sha256_equals_hashlib_across_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # more than one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_conversion_is_complete_only_with_config_weights_and_marker(tmp_path):
    assert not is_converted_dir(tmp_path, "source.json")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # sharded weights count
    assert not is_converted_dir(tmp_path, "source.json")
    (tmp_path / "source.json").write_text("{}")
    assert is_converted_dir(tmp_path, "source.json")
    (tmp_path / "model.safetensors.index.json").unlink()
    assert not is_converted_dir(tmp_path, "source.json")


def test_the_lock_excludes_a_second_holder(tmp_path):
    order = []

    def second():
        with file_lock(tmp_path / "x.lock"):
            order.append("b")

    with file_lock(tmp_path / "x.lock"):
        worker = threading.Thread(target=second)
        worker.start()
        time.sleep(0.2)
        order.append("a")
    worker.join(5)
    assert order == ["a", "b"]
