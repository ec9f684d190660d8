"""`deltamem quality BASE.gguf OTHER.gguf`: how much a quantized model drifts from its base.

Both models read the same tokens (the base model's tokenization of a text) in chunks of `ctx`
tokens, each chunk from an empty cache. At every position but a chunk's last, each model predicts
the next token; from those predictions we report:

- perplexity of each model on the text: exp of the mean negative log-likelihood of the actual next
  tokens (every position of a chunk is scored, from its first token on);
- KL(base ‖ other): how far OTHER's next-token distribution lies from BASE's, in nats, averaged over
  positions (also its 99th percentile and maximum);
- top-1 agreement: the share of positions where both models rank the same token first.

The default text is BUILTIN_TEXT below: a few thousand tokens of plain English prose, written for
this package, on assorted everyday subjects.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Rows of logits turned into float64 probabilities at a time: bounds the memory of the KL step.
_ROWS_PER_STEP = 64


@dataclass
class QualityReport:
    base: str
    other: str
    n_tokens: int            # tokens read (per model)
    n_scored: int            # next-token predictions compared
    n_chunks: int
    ctx: int
    ppl_base: float
    ppl_other: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float    # fraction in [0, 1]

    def table(self) -> str:
        rows = [
            ("", "BASE", "OTHER"),
            ("file", Path(self.base).name, Path(self.other).name),
            ("perplexity", f"{self.ppl_base:.4f}", f"{self.ppl_other:.4f}"),
            ("KL mean (nats)", "", f"{self.kl_mean:.6f}"),
            ("KL p99", "", f"{self.kl_p99:.6f}"),
            ("KL max", "", f"{self.kl_max:.6f}"),
            ("top-1 agreement", "", f"{100 * self.top1_agreement:.2f}%"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        lines.append(f"{self.n_scored} predictions from {self.n_tokens} tokens in {self.n_chunks} "
                     f"chunk(s) of at most {self.ctx}")
        return "\n".join(lines)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class _Scores:
    """Per-position numbers, gathered chunk by chunk."""
    nll_base: list
    nll_other: list
    kl: list
    same_top1: list

    def add(self, logits_base: np.ndarray, logits_other: np.ndarray, targets: np.ndarray) -> None:
        for start in range(0, len(targets), _ROWS_PER_STEP):
            rows = slice(start, start + _ROWS_PER_STEP)
            lp_b, lp_o = _log_softmax(logits_base[rows]), _log_softmax(logits_other[rows])
            t = targets[rows]
            pick = np.arange(len(t))
            self.nll_base.append(-lp_b[pick, t])
            self.nll_other.append(-lp_o[pick, t])
            # KL(P‖Q) = Σ p (log p − log q); clamp the tiny negatives that rounding can leave.
            self.kl.append(np.maximum((np.exp(lp_b) * (lp_b - lp_o)).sum(axis=-1), 0.0))
            self.same_top1.append(lp_b.argmax(axis=-1) == lp_o.argmax(axis=-1))


def _chunks(tokens: list[int], prefix: list[int], ctx: int) -> list[list[int]]:
    """Consecutive pieces of `tokens`, each led by `prefix` (BOS when the model adds one), ≤ ctx long."""
    step = ctx - len(prefix)
    if step < 2:
        raise ValueError(f"--ctx {ctx} is too small")
    pieces = [prefix + tokens[i:i + step] for i in range(0, len(tokens), step)]
    return [p for p in pieces if len(p) >= 2]  # a chunk needs a token to predict from and one to predict


def evaluate(base_path: str, other_path: str, text: str | None = None, *, n_tokens: int | None = None,
             ctx: int = 512, n_threads: int | None = None) -> QualityReport:
    """Compare OTHER with BASE on `text` (default: BUILTIN_TEXT), at most `n_tokens` tokens."""
    from .model import Model

    if ctx < 2:
        raise ValueError("ctx must be at least 2")
    text = BUILTIN_TEXT if text is None else text
    with Model(base_path, n_ctx=ctx, n_batch=ctx, n_threads=n_threads) as base, \
            Model(other_path, n_ctx=ctx, n_batch=ctx, n_threads=n_threads) as other:
        if base.n_vocab != other.n_vocab:
            raise ValueError(f"the models have different vocabularies ({base.n_vocab} vs {other.n_vocab} tokens)")
        tokens = base.tokenize(text, add_special=False)
        if other.tokenize(text, add_special=False) != tokens:
            raise ValueError("the models tokenize the text differently; they must share a tokenizer")
        if n_tokens is not None:
            tokens = tokens[:max(0, n_tokens)]
        prefix = _special_prefix(base)
        chunks = _chunks(tokens, prefix, ctx)
        if not chunks:
            raise ValueError("the text is too short: at least 2 tokens are needed")
        scores = _Scores([], [], [], [])
        ctx_b, ctx_o = base.context(), other.context()
        for chunk in chunks:
            ctx_b.reset()
            ctx_o.reset()
            logits_b = ctx_b.decode(chunk, logits="all")[:-1]
            logits_o = ctx_o.decode(chunk, logits="all")[:-1]
            scores.add(logits_b, logits_o, np.asarray(chunk[1:], dtype=np.int64))
    kl = np.concatenate(scores.kl)
    return QualityReport(
        base=str(base_path), other=str(other_path), n_tokens=len(tokens), n_scored=int(kl.size),
        n_chunks=len(chunks), ctx=ctx,
        ppl_base=math.exp(float(np.concatenate(scores.nll_base).mean())),
        ppl_other=math.exp(float(np.concatenate(scores.nll_other).mean())),
        kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
        top1_agreement=float(np.concatenate(scores.same_top1).mean()))


def _special_prefix(model) -> list[int]:
    """The tokens the model puts before any text (BOS for models that add one), as a fresh chunk needs."""
    with_special = model.tokenize("a", add_special=True)
    without = model.tokenize("a", add_special=False)
    return with_special[:len(with_special) - len(without)] if with_special[-len(without):] == without else []


# ----------------------------------------------------------------------------- command line

def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quality", help="perplexity, KL divergence and top-1 agreement of a model against a base",
        description="Run BASE and OTHER over the same text and report each one's perplexity, the KL divergence "
                    "of OTHER's next-token distribution from BASE's, and how often their top tokens agree.")
    parser.add_argument("base", metavar="BASE.gguf", help="reference model (e.g. the f16 original)")
    parser.add_argument("other", metavar="OTHER.gguf", help="model to compare (e.g. a quantization of BASE)")
    parser.add_argument("--text", metavar="FILE", default=None,
                        help="UTF-8 text to evaluate on (default: a built-in set of paragraphs)")
    parser.add_argument("--tokens", type=int, default=None, metavar="N", help="use at most N tokens of the text")
    parser.add_argument("--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="threads per model")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    text = None
    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        text = path.read_text(encoding="utf-8")
    if args.tokens is not None and args.tokens < 2:
        raise ValueError("--tokens must be at least 2")
    report = evaluate(args.base, args.other, text, n_tokens=args.tokens, ctx=args.ctx, n_threads=args.threads)
    print(json.dumps(asdict(report), indent=2) if args.json else report.table())
    return 0


# ----------------------------------------------------------------------------- the default text

BUILTIN_TEXT = "\n\n".join([
    # Written for pydeltamem; plain prose on everyday subjects, about 3,000 tokens in all.
    "The lighthouse on the northern point was built of grey stone that the builders carried up from the "
    "quarry by cart, one load each morning, for the better part of two summers. When it was finished the "
    "keeper moved into the small house at its foot with his wife, two goats and a shelf of books. Every "
    "evening he climbed the hundred and twelve steps, trimmed the wick, polished the glass and wrote the "
    "weather in a ledger: wind from the west, light rain, three boats seen before dark. Years later his "
    "daughter found the ledgers in a trunk and read them like a diary, because between the notes on wind "
    "and rain he had written, in very small letters, what the family ate, who was ill and when the first "
    "swallows came back.",

    "Bread asks for patience more than skill. Mix flour, water, salt and a little yeast until no dry flour "
    "remains, then leave the dough alone for half an hour so that the flour can drink the water. Fold it a "
    "few times, cover the bowl and wait again. The dough will rise slowly, and a slow rise gives the loaf "
    "more flavour than a quick one. When it has nearly doubled, shape it gently, let it rest while the oven "
    "heats, and bake it hot at first and cooler later. The crust should sound hollow when you tap the bottom "
    "of the loaf. Let it cool before cutting it, however hard that is, because the crumb is still setting "
    "while the bread is warm.",

    "A river begins as rain that the ground cannot hold. Water gathers in small channels, the channels join, "
    "and the stream that forms carries sand and pebbles downhill. Where the slope is steep the water cuts "
    "deep and narrow valleys; where the land flattens it slows down, drops what it carries and begins to "
    "wander from side to side. Over thousands of years those loops move across the plain, leaving behind "
    "curved lakes where an old bend was cut off. Near the sea the river spreads into many arms and builds "
    "new land from the mud it brings, which is why some coastal towns that once stood on the shore now lie "
    "several miles inland.",

    "Dear Marta, thank you for the parcel, which arrived on Tuesday with only one corner crushed. The seeds "
    "are already in the ground along the south wall, and the jar of honey did not last the week. The weather "
    "here has been strange: warm enough to sit outside at noon, and cold enough at night that the water in "
    "the bucket froze twice. Tomas has started school and comes home every day with a new question. "
    "Yesterday he wanted to know why the moon follows the car, and today why bees do not get lost. I told "
    "him I would ask you, since you know more about bees than anyone I have met. Write soon, and tell me "
    "whether the roof held during the storm.",

    "To fix a flat bicycle tyre you need two tyre levers, a patch kit or a spare tube, and a pump. Take the "
    "wheel off the frame, let out any air that is left, and push the levers under the edge of the tyre to "
    "lift one side over the rim. Pull out the tube and pump a little air into it; hold it near your ear or "
    "your cheek to find the hole. Roughen the rubber around the hole, spread a thin layer of glue, wait until "
    "it turns dull, and press the patch on firmly. Before you put the tube back, run your fingers carefully "
    "around the inside of the tyre, because the thorn or the piece of glass that made the hole is often still "
    "there and will make another one.",

    "\"Are you sure this is the right road?\" asked Lena, looking at the map upside down. \"Quite sure,\" said "
    "her brother, who was not sure at all. They had left the village at eight, and by eleven the paved road "
    "had become gravel, and the gravel had become two dusty tracks with grass between them. A farmer on a "
    "tractor stopped to let them pass and, when they asked about the lake, laughed and pointed back the way "
    "they had come. \"You turned left at the chapel,\" he said. \"Everyone does. The sign fell down in the "
    "spring and nobody has put it back up.\" They thanked him, turned the car around, and agreed not to "
    "mention the detour to anyone.",

    "Numbers have habits. Every whole number greater than one is either prime or a product of primes, and "
    "that product is unique apart from the order of its factors. The sum of the first n odd numbers is n "
    "squared: one, four, nine, sixteen, twenty-five. If you double a number and add one you always get an "
    "odd number, and if you multiply two odd numbers the result is odd as well. A number is divisible by "
    "three exactly when the sum of its digits is, so 471 is divisible by three because four plus seven plus "
    "one is twelve. These patterns are small, but noticing them is how many children first discover that "
    "mathematics is not only a list of rules to memorise.",

    "The market opens before sunrise. Vans back up to the stalls with their lights still on, and the sellers "
    "unload crates of apples, cabbages, eggs and cut flowers while the coffee stand fills the square with "
    "steam. The first customers are cooks from the restaurants nearby, who buy quickly and in large amounts. "
    "Later come the retired couples, who walk the whole length of the market twice before buying anything, "
    "and after them the parents with small children and the students who have not slept. By one o'clock the "
    "stalls are half empty, the prices drop, and the pigeons take over the cobblestones.",

    "Sleep is not simply the absence of waking. Through the night the brain moves through several stages, "
    "from light sleep, in which a small noise can wake you, to deep sleep, in which the body repairs tissue "
    "and the heart slows down, and then to the stage in which most vivid dreams occur. A full cycle takes "
    "about an hour and a half and repeats four or five times. People who are woken in the middle of deep "
    "sleep often feel confused and heavy, while those woken at the end of a cycle feel more alert, even if "
    "they slept for less time. Regular hours, a dark room and a cool temperature help more than most remedies.",

    "When the old library closed, the town voted to turn the building into a workshop that anyone could use. "
    "The reading room became a space with long tables, sewing machines and a rack of hand tools; the basement, "
    "once full of damp newspapers, now holds a kiln and two lathes. On Saturdays retired carpenters teach "
    "teenagers to make chairs, and in the evenings a woman who once repaired clocks for a living shows "
    "anyone who is interested how a spring and a gear train keep time. Nobody expected the place to be so "
    "busy. The council has already asked whether the old post office could follow the same path.",

    "Planning a garden starts with watching the light. For a week or two, note which corners get sun in the "
    "morning, which are bright at noon, and which stay in shade all day. Tomatoes, beans and most herbs want "
    "at least six hours of direct sun; lettuce and spinach are happy with less, and in hot summers they "
    "prefer it. Next, look at the soil: squeeze a handful after rain. If it forms a sticky ball it holds a "
    "lot of clay and drains slowly; if it falls apart at once it is sandy and dries fast. Both can be "
    "improved by adding compost year after year, which is slower than buying new soil but lasts much longer.",

    "The train was forty minutes late, and the waiting room filled up with people who had given up pretending "
    "to read. A man in a green coat began to tell the woman next to him about his trip to the mountains, and "
    "within a few minutes half the room was listening. He described a hut with no electricity, a dog that "
    "walked him to the summit and back, and a storm that arrived so quickly that he spent the night in a "
    "shepherd's shelter eating dried figs. When the train finally came, several passengers sat near him so "
    "that they could hear how the story ended. It ended, he admitted, with a very long walk down in wet boots.",

    "Computers store every number in binary, as a row of ones and zeros. A whole number is simple: each "
    "position stands for a power of two, so the row 1011 means eight plus two plus one, which is eleven. "
    "Fractions are harder. A number such as one tenth has no exact binary form, in the same way that one "
    "third has no exact decimal form, so the machine keeps the closest value it can and accepts a tiny error. "
    "Most of the time the error is too small to matter, but when millions of such numbers are added together "
    "the errors can pile up, and careful programs add the small numbers first or keep a running correction.",

    "Early in the morning the harbour smells of salt, diesel and wet rope. The fishing boats come in one "
    "after another, low in the water, followed by gulls that scream and dive for anything thrown overboard. "
    "On the quay the catch is sorted into boxes of ice: cod in one, flat fish in another, a few crabs that "
    "crawl over the edge and have to be put back. Buyers walk along the boxes with notebooks, and the price "
    "of each box is settled in a few words. By nine the quay has been hosed down, the boats are tied up in a "
    "neat row, and the crews are asleep or in the café on the corner.",

    "Learning a new language as an adult is slower than it is for a child, but adults have advantages too. "
    "They can read grammar explanations, keep a notebook of useful phrases, and choose what to practise. "
    "Most teachers agree that a little every day works better than a long session once a week. Listening "
    "matters more than many learners think: the ear has to get used to the rhythm of the language before the "
    "mouth can copy it. Mistakes are part of the process. People who speak a second language well usually "
    "made thousands of errors on the way and simply kept talking.",

    "The storm reached the valley in the late afternoon. First the wind turned the leaves of the poplars "
    "silver side up, then the light went a strange yellow, and then the rain came down so hard that the "
    "gutters overflowed within minutes. The power failed at six. The family lit candles, found the radio "
    "that ran on batteries, and listened to reports of fallen trees on the main road. The children thought "
    "it was the best evening of the year. In the morning the sky was clear and washed, the river was brown "
    "and loud, and a neighbour's trampoline was lying upside down in the middle of the field.",

    "A good recipe for lentil soup needs very little. Soften a chopped onion, a carrot and a stick of celery "
    "in olive oil, add two cloves of garlic and a spoonful of cumin, and stir until the kitchen smells "
    "wonderful. Add a cup of rinsed red lentils, a tin of tomatoes and about a litre of water or stock, and "
    "let it simmer for twenty-five minutes, until the lentils fall apart. Season it with salt, pepper and a "
    "squeeze of lemon. Some people blend it smooth, others leave it rough; either way it is better on the "
    "second day, and it freezes well.",

    "Bees find their way home by the sun, by landmarks and by smell. A forager that has found a good patch "
    "of flowers returns to the hive and performs a dance on the comb: the angle of the dance tells the other "
    "bees the direction of the flowers relative to the sun, and the length of the waggling part tells them "
    "how far to fly. The other bees follow the dancer closely, touching her with their antennae and tasting "
    "the nectar she brought back. Within an hour dozens of them may be working the same field, and the "
    "dance changes as the flowers are emptied and new ones are found.",

    "My grandmother kept a drawer of things that might be useful one day: string, rubber bands, keys that "
    "opened nothing, buttons of every colour, the instructions for a radio she no longer owned. As a child I "
    "thought it was the most interesting place in the house. When she moved into a smaller flat we emptied "
    "the drawer together, and she told a story about almost every object. The brass key had belonged to a "
    "shop where she worked at sixteen. The blue button came from the coat she wore on the day she met my "
    "grandfather. In the end we threw away very little.",

    "Maps are always simplified. A map of a whole country cannot show every street, and a map of a city "
    "cannot show every tree, so the mapmaker chooses what matters for the reader. A hiking map shows paths, "
    "contour lines and springs but ignores shops; a road map shows petrol stations and ignores most hills. "
    "Even the shape of the land changes from map to map, because a round planet cannot be drawn flat without "
    "stretching something. The familiar world map makes the countries near the poles look far larger than "
    "they are, which is why many people are surprised to learn how big Africa really is.",

    "The first week at a new job is mostly about names. There are the names of colleagues, which you forget "
    "as soon as you hear them, the names of systems and projects, which everyone uses as if you had always "
    "known them, and the names of meeting rooms, which are often rivers or mountains for no reason anyone "
    "remembers. It helps to keep a list and to ask again without embarrassment. By the end of the month most "
    "of the names have attached themselves to faces and tasks, and one day you hear yourself explaining one "
    "of them to someone who has just arrived.",

    "Walking is underrated as a way to think. Many writers and scientists have described solving a problem "
    "while walking, not while sitting at the desk where they had struggled with it for hours. The steady pace, "
    "the changing view and the lack of a screen seem to let the mind wander in useful directions. A walk does "
    "not have to be long or scenic. Twenty minutes around the block, without headphones, is often enough to "
    "turn a knot of half-formed ideas into a plan. The trick is to carry something to write with, because the "
    "good idea tends to arrive just when you are furthest from home.",
])
