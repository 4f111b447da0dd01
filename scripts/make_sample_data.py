"""Writes the bundled preference sample, c2f_jax/data/hh_sample.jsonl (our own text, HH-RLHF format).

  python scripts/make_sample_data.py            # deterministic: same file every time

Each row is {"chosen": ..., "rejected": ...}, two "\\n\\nHuman: ... \\n\\nAssistant: ..."
transcripts sharing every turn but the last answer. The preference is learnable:
the chosen answer is on topic and detailed; the rejected one is curt, evasive or
about another topic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from c2f_jax.runtime import workdir

OUT = Path(__file__).resolve().parent.parent / "c2f_jax" / "data" / "hh_sample.jsonl"

# topic -> (question subject, three facts we can explain it with)
TOPICS = {
    "tides": (
        "ocean tides",
        [
            "the Moon's gravity pulls on the oceans and raises a bulge of water",
            "the Earth rotates under two bulges, so most coasts see two high tides a day",
            "when the Sun and Moon line up the tides are larger, which are called spring tides",
        ],
    ),
    "rainbows": (
        "rainbows",
        [
            "sunlight is bent and split into colours as it enters raindrops",
            "light reflects off the back of each drop and leaves at about forty-two degrees",
            "each colour leaves at a slightly different angle, so the colours form separate bands",
        ],
    ),
    "bread": (
        "bread rising",
        [
            "yeast eats the sugars in the dough and releases carbon dioxide",
            "gluten from kneaded flour forms a stretchy net that traps the gas",
            "the heat of the oven makes the gas expand before the crumb sets",
        ],
    ),
    "vaccines": (
        "vaccines",
        [
            "a vaccine shows the immune system a harmless piece or copy of a germ",
            "the body makes antibodies and memory cells against it",
            "if the real germ arrives later, the memory cells respond much faster",
        ],
    ),
    "seasons": (
        "the seasons",
        [
            "the Earth's axis is tilted by about twenty-three degrees",
            "for half the year one hemisphere leans toward the Sun and gets more direct light",
            "longer days and a higher Sun give summer, shorter days and a lower Sun give winter",
        ],
    ),
    "compound": (
        "compound interest",
        [
            "interest is added to the balance at the end of each period",
            "the next period earns interest on the earlier interest as well",
            "over many years this makes the balance grow faster and faster",
        ],
    ),
    "photosynthesis": (
        "photosynthesis",
        [
            "plants capture light energy with chlorophyll in their leaves",
            "they use it to turn water and carbon dioxide into sugar",
            "oxygen is released as a by-product of splitting water",
        ],
    ),
    "sleep": (
        "sleep",
        [
            "during sleep the brain sorts and stores memories from the day",
            "the body repairs tissue and releases growth hormone",
            "adults usually need seven to nine hours to feel rested",
        ],
    ),
    "volcanoes": (
        "volcanoes",
        [
            "molten rock called magma rises because it is lighter than the rock around it",
            "gas dissolved in the magma expands as the pressure drops near the surface",
            "when the pressure is released quickly the eruption can be explosive",
        ],
    ),
    "batteries": (
        "batteries",
        [
            "a battery stores energy in two different chemical materials",
            "a reaction moves electrons from one side to the other through the outer circuit",
            "charging a rechargeable battery pushes the reaction back the other way",
        ],
    ),
    "thunder": (
        "thunder",
        [
            "lightning heats the air around it to several times hotter than the Sun's surface",
            "the hot air expands so fast that it makes a shock wave",
            "we hear that wave as thunder, later than the flash because sound is slower than light",
        ],
    ),
    "recycling": (
        "recycling",
        [
            "sorted materials such as paper, glass and metal are cleaned and broken down",
            "they are turned back into raw material for new products",
            "this saves energy and reduces the waste sent to landfill",
        ],
    ),
    "sourdough": (
        "sourdough starters",
        [
            "a starter is flour and water colonised by wild yeast and bacteria",
            "the bacteria make lactic acid, which gives the sour taste",
            "regular feeding keeps the microbes active and the starter healthy",
        ],
    ),
    "internet": (
        "how the internet works",
        [
            "data is split into small packets with addresses on them",
            "routers pass each packet along toward its destination",
            "the receiving computer puts the packets back together in order",
        ],
    ),
    "muscles": (
        "building muscle",
        [
            "hard exercise makes tiny tears in muscle fibres",
            "the body repairs them and makes the fibres a little thicker",
            "enough protein and rest are needed for that repair to happen",
        ],
    ),
    "stars": (
        "why stars shine",
        [
            "stars fuse hydrogen into helium deep in their cores",
            "the fusion releases a great deal of energy as light and heat",
            "that energy slowly works its way out to the surface and into space",
        ],
    ),
    "coffee": (
        "caffeine",
        [
            "caffeine blocks adenosine, a chemical that makes us feel sleepy",
            "it takes effect in about half an hour",
            "its effect fades over five to six hours as the liver breaks it down",
        ],
    ),
    "earthquakes": (
        "earthquakes",
        [
            "the Earth's crust is broken into plates that slowly move",
            "stress builds where plates lock together along a fault",
            "when the rock suddenly slips, the stored energy shakes the ground",
        ],
    ),
    "budget": (
        "making a budget",
        [
            "list your income and all your regular expenses",
            "set aside money for savings before spending on extras",
            "review the budget each month and adjust what does not work",
        ],
    ),
    "plants": (
        "watering houseplants",
        [
            "most houseplants like the soil to dry a little between waterings",
            "too much water fills the soil and rots the roots",
            "a pot with drainage holes lets extra water escape",
        ],
    ),
    "memory": (
        "computer memory",
        [
            "memory holds the data a program is working on right now",
            "it is much faster than a disk but loses its contents without power",
            "more memory lets a computer keep more programs open at once",
        ],
    ),
    "clouds": (
        "clouds",
        [
            "warm moist air rises and cools as it goes up",
            "cool air cannot hold as much water vapour, so it condenses on dust",
            "billions of tiny droplets together form the clouds we see",
        ],
    ),
    "bees": (
        "honey bees",
        [
            "bees collect nectar from flowers and carry it back to the hive",
            "they add enzymes and fan it with their wings to evaporate the water",
            "the thick result is honey, stored in wax cells as food for winter",
        ],
    ),
    "languages": (
        "learning a language",
        [
            "short daily practice works better than long rare sessions",
            "listening to native speakers trains the ear and the accent",
            "speaking early, even with mistakes, builds confidence",
        ],
    ),
    "magnets": (
        "magnets",
        [
            "in a magnet the tiny magnetic fields of many atoms line up together",
            "their combined field attracts iron and other magnets",
            "opposite poles attract while like poles push each other away",
        ],
    ),
    "fever": (
        "fever",
        [
            "a fever is the body raising its temperature on purpose",
            "higher temperature makes it harder for many germs to multiply",
            "drinking fluids and resting help, and a very high fever needs a doctor",
        ],
    ),
    "chess": (
        "getting better at chess",
        [
            "study common tactics such as forks and pins",
            "control the centre and develop your pieces early",
            "review your lost games to find the moves that went wrong",
        ],
    ),
    "glaciers": (
        "glaciers",
        [
            "snow that does not melt in summer piles up year after year",
            "its weight presses the lower layers into dense ice",
            "the ice becomes so heavy that it slowly flows downhill",
        ],
    ),
    "credit": (
        "credit scores",
        [
            "a credit score summarises how reliably someone repays debts",
            "paying bills on time is the largest factor",
            "using only a small part of the available credit also helps",
        ],
    ),
    "airplanes": (
        "how airplanes fly",
        [
            "the wing's shape and angle push air downward",
            "pushing air down creates an upward force called lift",
            "engines provide thrust to keep air flowing over the wings",
        ],
    ),
}

QUESTIONS = [
    "Can you explain {s} to me?",
    "How does {s} work?",
    "I have always wondered about {s}. What is going on there?",
    "What should I know about {s}?",
    "Could you describe {s} in simple terms?",
    "My kid asked me about {s} and I didn't know what to say. Can you help?",
    "Tell me about {s}, please.",
]
OPENERS = ["Sure.", "Good question.", "Happy to explain.", "Of course.", "Here is how it works."]
CLOSERS = [
    "Put together, that is the whole story in a nutshell.",
    "So the key idea is how these steps build on each other.",
    "I hope that makes it clearer; ask me if any step is confusing.",
    "Each of these steps matters, and together they explain what you see.",
]
CURT = [
    "I don't know.",
    "Look it up.",
    "No idea, sorry.",
    "Why do you care?",
    "That's not something I can help with.",
    "It just does.",
    "Whatever.",
    "Ask someone else.",
]
SMALL_TALK = [
    ("Hi there, are you busy?", "Not at all, what can I do for you?"),
    ("Hello! I have a question.", "Hello! Go ahead, I'm listening."),
    ("Good morning.", "Good morning! How can I help today?"),
]


def detailed_answer(subject: str, facts: list[str], rng: random.Random) -> str:
    first, second, third = facts
    return (
        f"{rng.choice(OPENERS)} Here is what matters about {subject}. First, {first}. Then {second}. "
        f"Finally, {third}. {rng.choice(CLOSERS)}"
    )


def transcript(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)


def make_rows(seed: int = 0, n: int = 360) -> list[dict]:
    rng = random.Random(seed)
    keys = sorted(TOPICS)
    rows = []
    for i in range(n):
        topic = keys[i % len(keys)]
        subject, facts = TOPICS[topic]
        question = rng.choice(QUESTIONS).format(s=subject)
        history = [rng.choice(SMALL_TALK)] if rng.random() < 0.3 else []
        chosen = detailed_answer(subject, facts, rng)
        kind = rng.random()
        if kind < 0.35:
            rejected = rng.choice(CURT)
        elif kind < 0.65:
            other = rng.choice([k for k in keys if k != topic])
            rejected = detailed_answer(*TOPICS[other], rng)  # fluent, detailed, but about something else
        else:
            rejected = f"{rng.choice(OPENERS)} {facts[0].capitalize()}."  # on topic but thin
        rows.append(
            {
                "chosen": transcript(history + [(question, chosen)]),
                "rejected": transcript(history + [(question, rejected)]),
            }
        )
    return rows


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    workdir.write_text(OUT, "".join(json.dumps(r) + "\n" for r in make_rows()))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
