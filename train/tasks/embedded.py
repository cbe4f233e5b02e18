"""Offline tasks generated from a seed, so the whole pipeline (mid, SFT, RL, chat evals) runs with no download, in the
real tasks' format and scoring. Arithmetic: GSM8K-style word problems solved with the python tool (the text after its
output restates the result, as in GSM8K), scored by the "####" answer; Spelling: spell a word, or count a letter in it
(with the tool); Identity: "who are you?" (named right); NumberMC: "which number is the largest?" (4-way choice)."""
import random

from train.tasks.common import AnswerTask, MCTask, Task, mc_conversation

WORDS = ("apple banana cherry orange grape lemon melon peach river mountain forest ocean island garden window "
         "kitchen pencil letter bottle button candle doctor dragon engine finger flower guitar hammer jacket "
         "ladder mirror needle pepper pillow planet rabbit rocket saddle silver spider summer tomato turtle "
         "violin wallet winter yellow zipper balloon blossom bridge carpet castle cookie cotton desert dinner "
         "strawberry butterfly elephant chocolate umbrella mississippi committee parallel bookkeeper coffee "
         "tennis little puzzle ribbon scissors success address balloon cabbage village horizon library").split()
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia", "Max", "Nia", "Omar"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "shells", "cards", "pencils", "cookies", "stamps"]

class Generated(Task):
    """A task of `n` examples, example i generated from Random(seed * 1_000_003 + i) - no storage, any index."""

    def __init__(self, n=1000, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.n, self.seed = n, seed

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return self.generate(random.Random(self.seed * 1_000_003 + index))

class Arithmetic(Generated, AnswerTask):
    name = "arithmetic"
    PROBLEMS = (  # (question, expression, the text before the tool call), drawn with a, b, c in 2..30, 2..9, 2..9
        ("{name} has {a} {item} and buys {b} packs of {c} {item} each. How many {item} does {name} have now?",
         "{a} + {b} * {c}", "{name} gets {b} * {c} more {item}, so the total is "),
        ("{name} has {a} {item} and gives away {b} bags of {c} {item} each. How many {item} are left?",
         "{a} - {b} * {c}", "{name} gives away {b} * {c} {item}, so what is left is "),
        ("There are {b} boxes with {a} {item} in each box. How many {item} are there in total?", "{b} * {a}",
         "The total is "),
        ("{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?", "{a} // {b}",
         "Each friend gets "))

    def generate(self, rng):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 9)
        kind = rng.randrange(4)
        a = {1: a + b * c, 3: b * c}.get(kind, a)
        q, expr, pre = (t.format(name=name, item=item, a=a, b=b, c=c) for t in self.PROBLEMS[kind])
        result = str(eval(expr))  # noqa: S307 - our own generated expression
        parts = [{"type": "text", "text": pre}, {"type": "python", "text": expr},
                 {"type": "python_output", "text": result}, {"type": "text", "text": f"{result}.\n#### {result}"}]
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}

class Spelling(Generated, AnswerTask):
    name = "spelling"

    def generate(self, rng):
        word = rng.choice(WORDS)
        spelled = "-".join(word)
        if rng.random() < 0.5:
            q = rng.choice([f"Spell the word '{word}' letter by letter.", f"How do you spell {word}?"])
            return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": spelled}],
                    "kind": "spell"}
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        q = f"How many times does the letter '{letter}' appear in '{word}'?"
        n = str(word.count(letter))
        parts = [{"type": "text", "text": f"Spelled out, {word} is {spelled}. Counting '{letter}' with python: "},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"}, {"type": "python_output", "text": n},
                 {"type": "text", "text": f"{n}.\n#### {n}"}]
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}], "kind": "count"}

    def evaluate(self, conversation, completion):
        if conversation.get("kind") == "spell":
            return int(completion.strip().lower() == conversation["messages"][-1]["content"])
        return super().evaluate(conversation, completion)  # the "####" count

class Identity(Generated):
    name = "identity"
    QUESTIONS = ["Who are you?", "What is your name?", "Hi! What are you?", "Tell me about yourself.",
                 "Who made you?", "Are you ChatGPT?", "hello", "What can you do?"]
    ANSWERS = ["I am tritonchat, a small language model trained from scratch with hand-written Triton kernels.",
               "My name is tritonchat. I am a small chat model; I can answer simple questions and use a python tool.",
               "Hello! I am tritonchat, a tiny assistant built in the style of nanochat.",
               "I'm tritonchat, a small open language model. I can chat, spell words and do arithmetic with python."]

    def generate(self, rng):
        return {"messages": [{"role": "user", "content": rng.choice(self.QUESTIONS)},
                             {"role": "assistant", "content": rng.choice(self.ANSWERS)}]}

    def evaluate(self, conversation, completion):
        return int("tritonchat" in completion.lower())

class NumberMC(Generated, MCTask):
    name = "number_mc"

    def generate(self, rng):
        nums = rng.sample(range(1, 100), 4)
        return mc_conversation("Which number is the largest?", [str(x) for x in nums], nums.index(max(nums)))
