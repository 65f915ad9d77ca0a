"""The fbank kernel's traffic model (benches/fbank_traffic_model.py): the figures the kernel's
comments and the README quote, and the wavefront rules it counts with."""
from benches import fbank_traffic_model as model


def test_counts_quoted_in_the_kernel_and_readme():
    total = {layout: sum(s + g for s, g in model.count(layout, 512, 400, 128).values()) for layout in ("measured", "current")}
    assert total == {"measured": 1177, "current": 415}


def test_shared_memory_wavefronts():
    # 32 lanes, 16 bytes each, consecutive: four phases of 8 lanes, no conflict.
    assert model.shared_wavefronts({lane: 16 * lane for lane in range(32)}, 16) == 4
    # The unpadded first pass's stores: a 128-byte stride puts every lane of a phase in one bank group.
    assert model.shared_wavefronts({lane: 128 * lane for lane in range(32)}, 16) == 32
    # The padded layout's 144-byte stride spreads them over the 32 banks.
    assert model.shared_wavefronts({lane: 144 * lane for lane in range(32)}, 16) == 4
    # One address for every lane is a broadcast.
    assert model.shared_wavefronts({lane: 0 for lane in range(32)}, 8) == 2


def test_global_lines():
    assert model.global_lines({lane: 4 * lane for lane in range(32)}, 4) == 1
    assert model.global_lines({lane: 8 * lane for lane in range(32)}, 8) == 2
    assert model.global_lines({lane: 4 + 16 * lane for lane in range(32)}, 16) == 5
