"""Tokenizer test corpus: strings chosen to exercise every branch of the pre-tokenizer patterns,
NFC normalisation, byte-level BPE and added-token splitting.

`CORPUS` holds hand-written strings by category plus seeded random mixtures; `unicode_sweep()` yields
strings that put every assigned code point into contexts where its character class (letter, number,
whitespace, other) and its NFC behaviour decide the split.
"""
from __future__ import annotations

import random
import unicodedata

PROSE = [
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris.",
    "  leading spaces",
    "trailing spaces   ",
    "A",
    "a",
    " ",
    "I",
    "Once upon a time, in a land far, far away, there lived a small dragon named Ember.",
    "She sells sea-shells by the sea-shore; the shells she sells are sea-shells, I'm sure.",
    "Mr. Smith went to Washington D.C. on Jan. 5th at 3 p.m. -- or was it 4?",
    "\"Quoted text\" and 'single quotes' and `backticks`.",
    "Parentheses (like this) [and this] {and this} <and this>.",
    "Semicolons; colons: commas, periods. Exclamations! Questions?",
    "e-mail: someone@example.com, web: https://www.example.org/path?query=1&x=y#frag",
    "Hyphenated-words and under_scored_words and CamelCaseWords and snake_case.",
    "ALL CAPS SENTENCE WITH SHOUTING!!!",
    "mIxEd CaSe TeXt wItH rAnDoM cApItAlS",
    "What... is... this...?",
    "Wait -- what? -- No!",
    "The year was 1999; the price was $19.99 (plus 7.5% tax).",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip.",
    "A long long long long long long long long long long long long long long sentence.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababababababab",
    "The memory matrix is written token by token while the model reads.",
    "Q: What is 2+2?\nA: 4.",
    "# Heading\n\nSome *markdown* with **bold**, _italic_ and a [link](http://x.y).\n\n- item 1\n- item 2\n",
    "> quoted line\n> another quoted line",
    "| col a | col b |\n|-------|-------|\n| 1     | 2     |",
    "Dear Sir or Madam,\n\nI am writing to inform you...\n\nSincerely,\nMe",
    "!!!???...,,,;;;:::",
    "----====____****++++",
    "~`!@#$%^&*()_+-={}[]|\\:\";'<>?,./",
    "#hashtag @mention $CASHTAG %percent ^caret &amp *star",
    "http://localhost:8080/api/v1/users/42?active=true",
]

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n\n    def norm(self) -> float:\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(10):\n\tprint(i * i)\n",
    "if (x > 0 && y < 10) { return x * y; } else { return -1; }",
    "#include <stdio.h>\n\nint main(void) {\n    printf(\"Hello, %s!\\n\", \"world\");\n    return 0;\n}\n",
    "const f = (a, b) => a ?? b;\nlet arr = [1, 2, 3].map(x => x * 2);",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "<html>\n  <body>\n    <p class=\"x\">Hi</p>\n  </body>\n</html>",
    "{\"key\": \"value\", \"list\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "$ ls -la | grep '.py' | wc -l\n",
    "x = [i for i in range(100) if i % 3 == 0]",
    "    indented with four spaces\n        and eight\n\t\tand two tabs",
    "import numpy as np\nimport torch.nn.functional as F\n",
    "  // comment\n  /* block\n     comment */\n",
    "a=1;b=2;c=a+b;d=c*c;e=d/2;",
    "while(1){i++;if(i>=100)break;}",
    "std::vector<std::string> v{\"a\", \"b\"};",
    "matrix[i][j] += alpha * x[i] * y[j];",
    "@decorator\ndef f(*args, **kwargs):\n    pass",
    "lambda x: x**2 + 2*x + 1",
    "git commit -m \"Fix bug #123: don't crash on empty input\"",
    "0x1F 0b1010 0o777 1e-5 3.0f 1_000_000 42L",
    "print(f\"{name!r:>10} = {value:.3f}\")",
    "key1=value1\r\nkey2=value2\r\n",
    "\tdef\tindented():\n\t\tpass\n",
    "    \n    \n",
    "x  =  y   +   z",
    "arr[0]->next->val;",
    "<|fake_token|> <not_special> </also_not>",
]

NUMBERS = [
    "0", "7", "12", "123", "1234", "12345", "123456", "1234567", "1234567890",
    "3.14159", "2.71828", "1,000,000", "1.000.000,00", "-42", "+7", "1e10", "6.022e23",
    "2024-01-15", "12:30:45", "v1.2.3", "192.168.0.1", "(555) 123-4567",
    "a1b2c3", "abc123def456", "123abc", " 123", "  1234 5678  ", "1 2 3 4 5",
    "00000000000000000000", "99999999999999999999999999999999",
    "\u0661\u0662\u0663 Arabic-Indic", "\u0967\u0968\u0969 Devanagari", "\uff11\uff12\uff13 fullwidth",
    "\u00b2\u00b3\u00b9 superscripts", "\u00bd \u00bc \u00be fractions", "\u2162 \u216b Roman",
    "\u2460\u2461\u2462 circled", "\u4e00\u4e8c\u4e09 \u3007 CJK numerals", "x\u00b2+y\u00b2=z\u00b2",
    "\U0001d7d9\U0001d7da math digits",
]

WHITESPACE = [
    "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", "\r\r\n",
    "a b", "a  b", "a   b", "a    b", "a\tb", "a\t\tb", "a\nb", "a\n\nb", "a\r\nb", "a\r\n\r\nb",
    "a \nb", "a\n b", "a \n b", "a  \n\n  b", "a \r\n\t b", "a\t \tb", " \t \n \r\n ",
    "line1\nline2\nline3", "line1\r\nline2\r\nline3\r\n", "para one.\n\n\npara two.",
    "end with newline\n", "end with spaces  ", "end with tab\t", "\n\nstarts with newlines",
    "  \n  indented after newline", "a\n\n\n\n\n\n\n\nb", "x" + " " * 40 + "y", "\t" * 10 + "tabs",
    "a \u000b b \u000c c", "mixed \t\n\r\n \t whitespace \n",
]

CONTRACTIONS = [
    "it's", "It's", "IT'S", "it'S", "I'll", "I'LL", "i'Ll", "we've", "WE'VE", "We'Ve",
    "they're", "THEY'RE", "They'Re", "I'm", "I'M", "you'd", "YOU'D", "don't", "DON'T", "Don'T",
    "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'x", "''", "'''s", "'s's", "' s",
    "y'all'd've", "rock'n'roll", "O'Neil's", "the dog's bone's", "'Twas the night",
    "It's 'quoted' and it'S", "CAN'T WON'T SHAN'T", "ma'am", "'sup", "'99", "'  s",
    "l'homme d'État", "'ſ \u017ft'ſa",
]

ACCENTS = [
    "caf\u00e9", "cafe\u0301", "na\u00efve", "nai\u0308ve", "\u00c5ngstr\u00f6m", "A\u030angstro\u0308m",
    "\u212b", "\u2126", "\u00f1", "n\u0303", "Espa\u00f1ol: ni\u00f1o, a\u00f1o, se\u00f1or",
    "Espan\u0303ol: nin\u0303o", "Ti\u1ebfng Vi\u1ec7t", unicodedata.normalize("NFD", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u"),
    "a\u0323\u0302", "a\u0302\u0323", "\u1ea1\u0302", "e\u0301\u0301\u0301", "\u0301abc", " \u0301", "1\u0301", "!\u0301",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333",
    "\u1100\u1161\u11a8", "\uac01", "\u1112\u1161\u11ab\u1100\u1173\u11af", "\ud55c\uae00",
    "\u0958", "\u0915\u093c", "\u0344", "\u0308\u0301", "\u03ac", "\u1f71", "\uf900", "\u8c48",
    "\u00e9\u00e8\u00ea\u00eb \u00c9\u00c8\u00ca\u00cb", "Stra\u00dfe", "\u0130stanbul \u0131", "\u0152uvre \u00e6sthetic",
    "cr\u00e8me br\u00fbl\u00e9e", "cre\u0300me bru\u0302le\u0301e", "Z\u00fcrich", "Zu\u0308rich",
    "\u1e9b\u0323", "\u0041\u030a\u0301", "\u01fa", "\u0226\u0304", "o\u0328\u0304", "\u01ed",
    "\u0e01\u0e34\u0e4a", "\u05e9\u05c1\u05bc", "\u05e9\u05bc\u05c1", "\u0627\u0653", "\u0622",
    "\u3099\u304b", "\u304b\u3099", "\u304c", "\u30cf\u309a", "\u1026\u102e", "\u1025\u102e",
]

SCRIPTS = [
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\u3002",
    "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff0c\u6211\u4eec\u53bb\u516c\u56ed\u6563\u6b65\u5427\u3002",
    "\u6771\u4eac\u90fd\u306f\u65e5\u672c\u306e\u9996\u90fd\u3067\u3059\u3002",
    "\u3072\u3089\u304c\u306a\u3068\u30ab\u30bf\u30ab\u30ca\u3068\u6f22\u5b57",
    "\u30b3\u30f3\u30d4\u30e5\u30fc\u30bf\u30fc\u30fb\u30b5\u30a4\u30a8\u30f3\u30b9",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4.", "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!",
    "\u4e2d\u6587English\u6df7\u5408mixed\u6587\u672ctext", "\uff21\uff22\uff23\uff44\uff45\uff46 fullwidth",
    "\u300c\u5f15\u7528\u300d\u3010\u62ec\u5f27\u3011\u300a\u4e66\u540d\u300b",
    "\U00020000\U0002a6d6 extension B", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22\u0e40\u0e1b\u0e47\u0e19\u0e20\u0e32\u0e29\u0e32\u0e17\u0e35\u0e48\u0e2a\u0e27\u0e22\u0e07\u0e32\u0e21",
    "\u0e01\u0e23\u0e38\u0e07\u0e40\u0e17\u0e1e\u0e21\u0e2b\u0e32\u0e19\u0e04\u0e23 \u0e51\u0e52\u0e53",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0627\u0644\u0644\u063a\u0629 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u062c\u0645\u064a\u0644\u0629 \u062c\u062f\u0627\u064b",
    "\u0628\u0650\u0633\u0652\u0645\u0650 \u0627\u0644\u0644\u0651\u064e\u0647\u0650",
    "\u0633\u0639\u0631 \u0661\u0662\u0663 \u062f\u0648\u0644\u0627\u0631\u060c \u062d\u0633\u0646\u0627\u064b\u061f",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd", "\u05d1\u05bc\u05b0\u05e8\u05b5\u05d0\u05e9\u05b4\u05c1\u05d9\u05ea",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u0419\u043e\u0434 \u0438 \u0439\u043e\u0434 \u0401\u0436 \u0451\u0436", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b5\u03af\u03bc\u03b5\u03bd\u03bf",
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e", "\u0ba4\u0bae\u0bbf\u0bb4\u0bcd", "\u10e5\u10d0\u10e0\u10d7\u10e3\u10da\u10d8",
    "\u0540\u0561\u0575\u0565\u0580\u0565\u0576", "\u12a0\u121b\u122d\u129b", "\u1798\u17b7\u1793", "\u0f56\u0f7c\u0f51",
]

EMOJI = [
    "\U0001f600", "\U0001f600\U0001f603\U0001f604", "I love it \U0001f60d!", "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f1eb\U0001f1f7\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5", "1\ufe0f\u20e3 #\ufe0f\u20e3",
    "\u2764\ufe0f \u2764", "\U0001f469\U0001f3fe\u200d\U0001f4bb coding", "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",
    "Party \U0001f389\U0001f38a\U0001f388 time", "\u2600\ufe0f\u2601\ufe0f\u2602\ufe0f",
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "smile:)\U0001f642(:",
    "\U0001f600 \U0001f600  \U0001f600", "\u00a9\u00ae\u2122", "\u2605\u2606\u2663\u2660\u2665\u2666",
    "\U0001f40d Python \U0001f980 Rust", "\U0001f44b\U0001f3fb\U0001f44b\U0001f3fc\U0001f44b\U0001f3fd\U0001f44b\U0001f3fe\U0001f44b\U0001f3ff",
]

UNICODE_SPACES = [
    "a\u00a0b", "100\u00a0km", "a\u00a0\u00a0b", "\u00a0leading", "trailing\u00a0", "a\u2002b\u2003c",
    "a\u2009b", "\u3000\u5168\u89d2\u3000", "a\u200bb", "zero\u200bwidth\u200bspace", "a\u2028b\u2029c",
    "a\u0085b", "a\u202fb", "a\u205fb", "\ufeffBOM", "a\u180eb", "a\u1680b", "a\u200c\u200db",
    "x \u00a0 y", "\u00a0\n\u00a0", "a\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200ab",
    "tab\u00a0\tnbsp", "\u001c\u001d\u001e\u001f separators", "a\u001cb",
]

MISC = [
    "\u201csmart quotes\u201d and \u2018single\u2019", "em\u2014dash and en\u2013dash", "ellipsis\u2026",
    "\u00ab guillemets \u00bb", "\u00bfQu\u00e9? \u00a1S\u00ed!", "\u00a7 1.2 \u00b6 3", "\u00b0C \u00b1 5\u00b0",
    "\u2200x\u2208\u211d: x\u00b2\u22650", "\u03b1 + \u03b2 = \u03b3", "\u221a2 \u2248 1.414", "\u2190\u2191\u2192\u2193\u21d2",
    "\u20ac100 \u00a350 \u00a5200 \u20b9300", "\u2022 bullet \u00b7 middot", "\U0001d400\U0001d401\U0001d402 math bold",
    "\x00\x01\x02 control", "del\x7fchar", "bell\x07", "\x1b[31mred\x1b[0m",
    "\ufffd replacement", "\ue000\uf8ff private use", "\U0010fffd", "\u00ad soft\u00adhyphen",
    "\u0600\u0601 Arabic number signs", "\u061c\u200e\u200f bidi marks", "\u2066isolate\u2069",
    "mixed \u65e5\u672c English \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 123",
    "a.b,c;d:e!f?g", "(a)(b)(c)", "\"\"\"docstring\"\"\"", "'''triple'''",
]

SPECIAL_TEXTS = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more text", "<|im_start|><|im_end|>", "<|im_start|>",
    "x<|im_end|>y", " <|im_end|> ", "<|im_start|>system\nYou are helpful.<|im_end|>",
    "<|im_start", "im_start|>", "<|im_start|", "<<|im_end|>>", "<|im_end|><|im_end|><|im_end|>",
    "<|endoftext|><|endoftext|>", "prefix <|endoftext|>suffix", "\n<|im_end|>\n",
    "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>", "<repo_name>pydeltamem<file_sep>main.py",
    "<jupyter_code>print(1)<jupyter_output>1", "<|box_start|>(1,2)<|box_end|>", "< think >",
    "<|im_start|>user\ncaf\u00e9 e\u0301<|im_end|>", "<think></think>", "<|im_end|>\u0301",
]


def _random_strings(n: int, seed: int) -> list[str]:
    """Seeded mixtures of the characters the patterns care about, in random orders and lengths."""
    pools = [
        "abcXYZ", "0123456789", " ", "  \t", "\n", "\r\n", "'", "sStTlLdDmMrReEvV",
        ".,!?;:-_()[]{}\"/\\", "\u00e9\u00e8\u00fc\u00f1\u00c5", "\u0301\u0308\u0323\u0302",
        "\u4e2d\u6587\u65e5\u672c", "\u0e44\u0e17\u0e22", "\u0627\u0644\u0639", "\U0001f600\U0001f44d\U0001f3fd",
        "\u200d\ufe0f", "\u00a0\u3000\u2003", "\u0661\u00b2\u00bd", "\u1100\u1161\u11a8",
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 40)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return out


RANDOM = _random_strings(60, seed=1234)

CORPUS: list[str] = (PROSE + CODE + NUMBERS + WHITESPACE + CONTRACTIONS + ACCENTS + SCRIPTS + EMOJI
                     + UNICODE_SPACES + MISC + SPECIAL_TEXTS + RANDOM)


def unicode_sweep(chunk: int = 24):
    """Strings covering every assigned code point (private use sampled), each in contexts where its
    class decides the split: between letters, next to digits, after a space and an apostrophe,
    doubled, and before punctuation and a newline."""
    cps = []
    for cp in range(0x110000):
        category = unicodedata.category(chr(cp))
        if category in ("Cn", "Cs"):
            continue
        if category == "Co" and cp % 997 != 0:
            continue
        cps.append(cp)
    for i in range(0, len(cps), chunk):
        parts = []
        for cp in cps[i:i + chunk]:
            c = chr(cp)
            parts.append(f"a{c}b {c}1{c}{c}'{c} {c}.\n{c}")
        yield "".join(parts)
