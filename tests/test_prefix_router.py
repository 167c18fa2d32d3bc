"""Prefix-aware routing's choice (launcher.prefix_router): a prompt goes to the replica holding its
longest prefix unless that replica is too much busier than the least busy, a new prompt to the least
busy. (tests/test_serve.py routes real requests across two replicas.)"""

from launcher.prefix_router import BLOCK_BYTES, PrefixRoutes, prompt_digests

SYSTEM = "You are a helpful assistant who answers briefly and cites the Python documentation. " * 4
IDLE = {"A": 0, "B": 0, "C": 0}


def first_choice(routes: PrefixRoutes, prompt, loads=IDLE, max_imbalance=2) -> list:
    return routes.choose(prompt_digests(prompt), dict(loads), max_imbalance)[0]


def test_digests_are_chained_so_a_shared_start_shares_its_blocks_and_nothing_after_a_difference():
    turn = SYSTEM + "User: what is a list?\nAssistant: a mutable sequence.\n"
    longer = prompt_digests(turn + "User: and a tuple?\n")
    assert len(longer) == len((turn + "User: and a tuple?\n").encode()) // BLOCK_BYTES
    assert longer[:len(prompt_digests(turn))] == prompt_digests(turn)
    changed = prompt_digests("X" + turn[1:] + "User: and a tuple?\n")
    assert not set(changed) & set(longer)  # a different first byte: every block differs
    assert len(prompt_digests("hi")) == 1 and prompt_digests([1, 2, 3]) != prompt_digests([1, 2, 4])
    assert prompt_digests(list(range(20)))[:2] == prompt_digests(list(range(16)))  # 8 token ids a block


def test_a_conversations_next_turn_goes_where_its_earlier_turns_went():
    turn1 = SYSTEM + "User: what is a list?\n"
    new_choice = first_choice(PrefixRoutes(), turn1)
    assert len(new_choice) == 1 and first_choice(PrefixRoutes(), turn1) == new_choice  # ties: a stable choice
    routes = PrefixRoutes()
    holder = next(r for r in IDLE if r != new_choice[0])  # not where a tie alone would send it
    routes.record(prompt_digests(turn1), holder)
    turn2 = turn1 + "Assistant: a mutable sequence.\nUser: and a tuple?\n"
    ranks = routes.choose(prompt_digests(turn2), dict(IDLE), 2)
    assert ranks == [[holder], sorted(set(IDLE) - {holder})]


def test_the_longest_match_wins_over_a_shared_system_prompt_and_ties_go_to_every_holder():
    routes = PrefixRoutes()
    for replica in IDLE:
        routes.record(prompt_digests(SYSTEM), replica)
    assert sorted(first_choice(routes, SYSTEM + "User: hello there, who are you?")) == ["A", "B", "C"]
    conversation = SYSTEM + "User: what is a dict?\nAssistant: a mapping from keys to values.\n"
    routes.record(prompt_digests(conversation), "B")
    assert first_choice(routes, conversation + "User: and a set?\n") == ["B"]


def test_a_replica_busier_than_the_imbalance_allows_loses_its_prefixes():
    routes = PrefixRoutes()
    prompt = SYSTEM + "User: what is a generator?\n"
    routes.record(prompt_digests(prompt), "A")
    assert first_choice(routes, prompt, {"A": 3, "B": 1, "C": 4}, max_imbalance=2) == ["A"]
    moved = first_choice(routes, prompt, {"A": 4, "B": 1, "C": 2}, max_imbalance=2)
    assert moved in (["B"], ["C"])
    ranks = routes.choose(prompt_digests(prompt), {"A": 4, "B": 1, "C": 2}, 2)
    assert sorted(ranks[1]) == sorted({"A", "B", "C"} - set(moved))  # the busy holder takes it if the rest are full


def test_a_new_prompt_goes_to_the_least_busy_and_the_next_request_for_it_follows():
    """A request's n choices are routed one after another, each before the last is confirmed."""
    routes = PrefixRoutes()
    prompt = SYSTEM + "User: name three sorting algorithms.\n"
    assert first_choice(routes, prompt, {"A": 3, "B": 1, "C": 2}) == ["B"]
    assert first_choice(routes, prompt, {"A": 3, "B": 2, "C": 2}) == ["B"]  # B is still within the imbalance
    assert first_choice(routes, "User: hello\n" * 8, {"A": 3, "B": 2, "C": 2}) in (["B"], ["C"])


def test_new_prompts_spread_over_the_replicas():
    routes = PrefixRoutes()
    loads = {f"replica-{i}": 0 for i in range(4)}
    counts = dict.fromkeys(loads, 0)
    for i in range(400):
        counts[first_choice(routes, f"{i} " + SYSTEM, loads)[0]] += 1
    assert all(60 <= count <= 140 for count in counts.values()), counts


def test_routes_forget_the_least_recently_routed_blocks_first():
    routes = PrefixRoutes(max_blocks=8)
    old, recent = "o" * 4 * BLOCK_BYTES, "r" * 4 * BLOCK_BYTES
    routes.record(prompt_digests(old), "A")
    routes.record(prompt_digests(recent), "B")
    routes.record(prompt_digests(old[:2 * BLOCK_BYTES]), "A")  # the old prompt's start is routed again
    routes.record(prompt_digests("n" * 2 * BLOCK_BYTES), "C")
    assert len(routes.holders) == 8
    assert routes.longest_match(prompt_digests(old), IDLE) == {"A"}  # its first two blocks are kept
    assert prompt_digests(old)[3] not in routes.holders
    assert routes.longest_match(prompt_digests(recent), IDLE) == {"B"}
