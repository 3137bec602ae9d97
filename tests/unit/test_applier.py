"""The applier: weights go to the keeper; a change of active region is a move, said once."""

from __future__ import annotations

from sidecar.applier import Applier


class Keeper:
    def __init__(self) -> None:
        self.desired: list[dict[str, int]] = []

    def set_desired(self, weights: dict[str, int]) -> None:
        self.desired.append(weights)


def test_the_first_weights_are_no_move_and_a_new_active_region_is_one() -> None:
    keeper, moves = Keeper(), []
    applier = Applier(keeper, on_move=lambda a, b, why: moves.append((a, b, why)))
    applier.apply({"us-east-1": 100, "eu-west-1": 0}, "start")
    applier.apply({"us-east-1": 100, "eu-west-1": 0}, "weights re-asserted")
    assert moves == [] and applier.active == "us-east-1"
    applier.apply({"us-east-1": 0, "eu-west-1": 100}, "us-east-1 down")
    assert moves == [("us-east-1", "eu-west-1", "us-east-1 down")]
    assert keeper.desired[-1] == {"us-east-1": 0, "eu-west-1": 100} and len(keeper.desired) == 3
