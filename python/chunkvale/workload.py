"""The demo's workload: chat requests that share one long system prompt, like a support bot whose
system prompt carries the store's policies and catalogue (the situation prefix sharing is for).

Deterministic: the same arguments give the same prompts, so runs are comparable.
"""

from __future__ import annotations

import random

_POLICIES = """You are Ada, the customer support assistant of Northwind Outfitters, an online store for
outdoor and travel gear. Answer the customer's question in two or three short sentences, using only
the store information below. If the information is not there, say so and offer to connect the
customer with a human agent. Be friendly and precise; quote prices in US dollars.

Store policies:
- Shipping: orders over $75 ship free within the continental US; otherwise shipping is $6.95.
  Standard delivery takes 3-5 business days, express (extra $14) takes 1-2 business days.
- Returns: unused items can be returned within 30 days for a full refund; opened items within 30
  days for store credit. Sale items marked FINAL cannot be returned.
- Warranty: tents, packs and sleeping bags carry a 2-year warranty against manufacturing defects.
- Price match: we match a lower price from a major US retailer within 14 days of purchase.
- Loyalty: members earn 1 point per dollar; 100 points are worth $5 off the next order.
- Support hours: Monday to Friday 8am-8pm Eastern, Saturday 10am-4pm Eastern.

Product catalogue (SKU | product | price | stock | notes):
"""

_KINDS = [
    ("tent", ["2-person", "3-person", "4-person", "ultralight", "family"]),
    ("backpack", ["28 L", "38 L", "45 L", "55 L", "65 L"]),
    ("sleeping bag", ["summer", "3-season", "winter", "down", "synthetic"]),
    ("jacket", ["rain", "down", "fleece", "softshell", "insulated"]),
    ("stove", ["canister", "liquid-fuel", "wood", "integrated", "two-burner"]),
    ("headlamp", ["200 lm", "350 lm", "500 lm", "rechargeable", "red-light"]),
    ("water filter", ["squeeze", "pump", "gravity", "bottle", "UV"]),
    ("hiking boot", ["mid", "low", "waterproof", "winter", "trail-runner"]),
]
_BRANDS = ["Alpine Ridge", "Cedar Peak", "Blue Fjord", "Summit Line", "Trailhead", "Ursa", "Kestrel", "Granite"]
_NOTES = ["bestseller", "new this season", "FINAL sale", "limited colours", "ships in 2 days",
          "backorder until next month", "members save 10%", "includes carry bag"]

_QUESTIONS = [
    "How much is the {p}, and is it in stock?",
    "Can I return the {p} if I already opened the box?",
    "I ordered the {p} yesterday. When will it arrive with standard shipping?",
    "Does the {p} come with a warranty?",
    "Is there anything special I should know about the {p}?",
    "What does shipping cost if I only buy the {p}?",
    "I saw the {p} cheaper at another big store last week. Can you match the price?",
    "How many loyalty points would I earn buying the {p}?",
]


def _catalogue(rng: random.Random, n: int) -> list[tuple[str, str]]:
    items = []
    for i in range(n):
        kind, variants = _KINDS[i % len(_KINDS)]
        name = f"{rng.choice(_BRANDS)} {rng.choice(variants)} {kind}"
        price = rng.randrange(19, 480) + 0.99
        line = f"NW-{1000 + i} | {name} | ${price:.2f} | {rng.randrange(0, 60)} in stock | {rng.choice(_NOTES)}"
        items.append((name, line))
    return items


def system_prompt(tokenizer, target_tokens: int) -> tuple[str, list[str]]:
    """A system prompt of about ``target_tokens`` tokens (never fewer) and its product names."""
    if target_tokens < 64:
        raise ValueError(f"system_tokens: expected >= 64, got {target_tokens}")
    n = 8
    while True:
        items = _catalogue(random.Random(1234), n)
        text = _POLICIES + "\n".join(line for _, line in items)
        size = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if size >= target_tokens:
            return text, [name for name, _ in items]
        # Grow in proportion to the shortfall; the catalogue is regenerated from the same seed,
        # so the prompt is deterministic.
        n = max(n + 1, int(n * target_tokens / max(size, 1)) + 1)


def chat_requests(tokenizer, *, requests: int, system_tokens: int, seed: int = 0) -> list[list[dict]]:
    """``requests`` chat conversations [system, user] sharing one system prompt."""
    if requests < 1:
        raise ValueError(f"requests: expected >= 1, got {requests}")
    system, products = system_prompt(tokenizer, system_tokens)
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        question = _QUESTIONS[i % len(_QUESTIONS)].format(p=rng.choice(products))
        out.append([{"role": "system", "content": system}, {"role": "user", "content": question}])
    return out
