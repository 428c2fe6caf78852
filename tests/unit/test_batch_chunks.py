"""Ray chunk sizing (no Ray needed): fixed, or about CHUNK_SECONDS of measured work, shrinking towards the end."""

from __future__ import annotations

from pipeline.ray_backend import CHUNK_SECONDS, IN_FLIGHT, _Chunks


def test_a_fixed_size_is_kept() -> None:
    chunks = _Chunks(7, slots=2)
    chunks.observe([1.0, 2.0])
    assert chunks.size(1000) == 7


def test_one_study_per_chunk_until_one_was_timed() -> None:
    assert _Chunks(None, slots=2).size(1000) == 1


def test_automatic_chunks_hold_about_chunk_seconds_of_work() -> None:
    chunks = _Chunks(None, slots=2)
    chunks.observe([0.01] * 9 + [5.0])  # one slow first study (a model load): the median ignores it
    assert chunks.size(10_000) == round(CHUNK_SECONDS / 0.01)
    chunks.observe([1.0] * 20)  # studies longer than CHUNK_SECONDS: one per chunk
    assert chunks.size(10_000) == 1


def test_automatic_chunks_leave_every_slot_a_share_of_what_is_left() -> None:
    chunks = _Chunks(None, slots=2)
    chunks.observe([0.001] * 10)  # 200 studies would make 0.2 s
    assert chunks.size(40) == 40 // (IN_FLIGHT * 2)
    assert chunks.size(3) == 1 and chunks.size(1) == 1
