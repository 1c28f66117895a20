"""The token rules of :mod:`ptb_tokenizer`, in the priority order of the Stanford lexer.

Each rule is a regular expression for the token, an optional trailing context (text that
must follow but stays unread, like JFlex's ``r1/r2``), and an action that turns the match
into tokens. The scanner takes the longest match (token plus trailing context) and, on a
tie, the earlier rule. The patterns were written from observing Stanford CoreNLP 3.4.1's
``PTBTokenizer`` on crafted inputs (see ``ptb_tokenizer``'s docstring), not from its source.
Where that lexer spells a word literally it ignores case, where it uses a character class
it does not; the patterns below keep that difference (``(?i:...)`` versus ``[A-Za-z]``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, List, NamedTuple, Optional, Tuple

Action = Callable[[str], Tuple[List[str], int]]


def _char_class(categories: Tuple[str, ...], extra: str = "") -> str:
    """A regex class of the BMP characters of the given Unicode categories, plus ``extra``."""
    parts, start, prev = [], None, None
    for code in range(0x80, 0x10000):
        if unicodedata.category(chr(code)) in categories:
            if start is None or code != prev + 1:
                if start is not None:
                    parts.append((start, prev))
                start = code
            prev = code
    parts.append((start, prev))
    body = "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in parts)
    return body + extra


_LETTERS = _char_class(("Lu", "Ll", "Lt", "Lm", "Lo"), "A-Za-z")
_DIGITS = _char_class(("Nd",), "0-9")
_WORD_EXTRA = "\u00ad\u0300-\u036f"  # soft hyphen, combining diacritics: inside words only
L = f"[{_LETTERS}]"
D = f"[{_DIGITS}]"
LD = f"[{_LETTERS}{_DIGITS}]"
UPPER = f"[{_char_class(('Lu',), 'A-Z')}]"
SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
NEWLINE = "(?:\r\n|[\n\r\u000b\u000c\u2028\u2029\u0085])"
SPACENL = f"(?:{SPACE}|{NEWLINE})"
APOS = "(?:['\u0092\u2019]|&apos;)"
APOSETC = "(?:['\u0092\u2019`\u0091\u2018\u201b]|&apos;)"
_WL = f"[{_LETTERS}{_WORD_EXTRA}]"
_WLD = f"[{_LETTERS}{_DIGITS}{_WORD_EXTRA}]"
WORD = f"{_WL}{_WLD}*(?:[.!?]{_WL}{_WLD}*)*"
ACRO = "[A-Za-z](?:\\.[A-Za-z])*"
ACRO2 = "[A-Za-z](?:\\.[A-Za-z])+"
SGML = (
    "<(?:[!?][A-Za-z-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9_:.-]*"
    "(?: +[A-Za-z][A-Za-z0-9_:.-]*(?: *= *(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.-]*))?)*"
    " */?) *>"
)
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\u00ad]+))+"
_FILE = f"[{_LETTERS}{_DIGITS}\u00ad]"
_THING1 = f"(?:[dDoOlL]{APOSETC}{LD})?{LD}+"
THING = f"{_THING1}(?:[-_\u058a\u2010\u2011]{_THING1})*"
THINGA = "[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
SENTEND = f"{SPACENL}(?:{SPACENL}|{UPPER}|{SGML}|\\Z)"


def _words(words: str) -> str:
    """Literal words, case-insensitive except a leading ``^`` marking a capital first letter."""
    alts = []
    for word in sorted(words.split(), key=len, reverse=True):
        if word.startswith("^"):
            alts.append(f"{word[1]}(?i:{re.escape(word[2:])})" if len(word) > 2 else word[1])
        else:
            alts.append(f"(?i:{re.escape(word)})")
    return "(?:" + "|".join(alts) + ")"


# Abbreviations kept with their period. ABBREV1 ones also end a sentence before a capital.
ABBREV1 = _words(
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri "
    "ala ariz ^Az ^Ark calif colo conn ct dak ^Del fla ga ^Ill ind kan kans ky ^La ^Mass md "
    "mich minn ^Miss mo mont neb nev okla ^Ore ^Pa penn tenn ^Tex va vt ^Wash wis wisc wyo "
    "inc co cos corp pty pte ptys ptes ppty ppte pptys pptes ltd plc rt bancorp bhd assn univ "
    "intl sys tel est ext sq jr sr bros ed.d ph.d blvd rd esq etc al seq bldg"
)
ABBREV2 = _words(
    "mr mrs ms ^Miss dr drs prof profs sen sens rep reps atty attys lt col gen messrs gov govs "
    "adm rev maj sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts "
    "det mt ft adj adv asst assoc ens insp mlle mme msgr sfc vs alex wm jos cie a.k.a cf treas "
    "ph invt elec natl mfg mtg dept"
)
FILE_EXT = _words(
    "c h x gz pl ps py bat bmp cgi cpp dll doc exe gif htm jar jpg mov pdf php png ppt sql tar "
    "txt wav xml zip html java jpeg docx class mp3"
)
ABBREV3 = _words("ca fig figs prop no nos art bldg pp op")
# Words after which an acronym's final period is also read as the end of a sentence.
STARTERS = _words(
    "^The ^A ^In ^As ^That ^An ^At ^It ^This ^We ^But ^About ^More ^Their ^One ^They ^Our "
    "^Other ^There ^You ^These ^Some ^What ^So ^After ^Now ^Such ^If ^Here ^Many ^When "
    "^According ^He ^Since ^Last ^Yet ^Her ^Then ^Once ^While ^She ^Earlier ^However "
    "^Additionally ^Mr. ^Ms."
)


def keep(text: str) -> Tuple[List[str], int]:
    return [text], len(text)


def const(token: str) -> Action:
    return lambda text: ([token], len(text))


def split_at(n: int) -> Action:
    """Emit the first ``n`` characters; the rest is read again."""
    return lambda text: ([text[:n]], n)


def reread_period(text: str) -> Tuple[List[str], int]:
    """An abbreviation ending a sentence: emitted whole, its period read again."""
    return [text], len(text) - 1


def acronym_end(text: str) -> Tuple[List[str], int]:
    """An acronym before a sentence starter: a single letter loses its period."""
    return [text[:-1] if len(text) == 2 else text], len(text) - 1


# Curly, CP1252 and angle quotes as the LaTeX-style ASCII ones the lexer writes.
_QUOTE_MAP = str.maketrans(
    dict.fromkeys("\u2018\u201b\u0091\u2039", "`")
    | dict.fromkeys("\u2019\u0092\u203a", "'")
    | dict.fromkeys("\u201c\u0093\u00ab", "``")
    | dict.fromkeys("\u201d\u0094\u00bb", "''")
)


def quotes(text: str) -> Tuple[List[str], int]:
    return [text.replace("&apos;", "'").translate(_QUOTE_MAP)], len(text)


def nbsp(text: str) -> Tuple[List[str], int]:
    return [text.replace(" ", "\u00a0")], len(text)


def word(text: str) -> Tuple[List[str], int]:
    """Soft hyphens vanish from words; one alone reads as a hyphen."""
    return [text.replace("\u00ad", "") or "-"], len(text)


def ampersand(text: str) -> Tuple[List[str], int]:
    return [re.sub("(?i)&amp;", "&", text)], len(text)


def hyphens(text: str) -> Tuple[List[str], int]:
    """One hyphen stays, two to four make a dash ``--``, longer runs stay as they are."""
    return ["-" if len(text) == 1 else "--" if len(text) <= 4 else text], len(text)


def smiley(text: str) -> Tuple[List[str], int]:
    return [text.replace("(", "-LRB-").replace(")", "-RRB-")], len(text)


_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#"} | dict.fromkeys("\u00a4\u0080\u20a0\u20ac", "$")
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
# Non-ASCII characters the lexer emits alone and unchanged (symbols, some punctuation).
MISC = (
    "\u00a1\u00a5-\u00a9\u00ac\u00ae-\u00b4\u00b6-\u00b9\u00bf\u00d7\u00f7\u037e\u0387\u0589"
    "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060c\u0614\u061b\u061e\u061f"
    "\u066a\u066d\u06d4\u0700-\u070d\u07f6-\u07f8\u0964\u0965\u0e3f\u0e4f\u1fbd\u2016\u2017"
    "\u201a\u201e-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u2070\u2074-\u207e\u2080-\u208e"
    "\u20a4\u2100\u2101\u2103-\u2106\u2108\u2109\u2114\u2116-\u2118\u211e-\u2123\u2125\u2127"
    "\u2129\u212e\u213a\u213b\u2140-\u2144\u214a-\u214d\u214f\u2155-\u215e\u2190-\u2bff"
    "\u3001\u3002\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\uffe0\uffe1"
    "\uffe5\uffe6"
)


class Rule(NamedTuple):
    """A token pattern (group ``m``, maybe followed by its trailing context) and its action."""

    regex: re.Pattern[str]
    action: Action


def _rule(pattern: str, action: Action = keep, trail: Optional[str] = None) -> Rule:
    body = f"(?P<m>{pattern})" + (f"(?:{trail})" if trail else "")
    return Rule(re.compile(body, re.DOTALL), action)


_URLCHAR = '[^ \t\n\f\r"<>|()]'
_URLEND = '[^ \t\n\f\r"<>|.!?(){},-]'
RULES: List[Rule] = [
    _rule(SGML, nbsp),
    _rule("&(?:(?i:MD|mdash|ndash));|[\u0096\u0097\u2013\u2014\u2015]", const("--")),
    _rule("(?i:&amp;)", const("&")),
    _rule("&(?:(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq)|#[0-9]+);"),
    _rule("(?i:cannot)", split_at(3)),
    _rule("(?i:gonna|gotta|wanna|lemme|gimme)", split_at(3)),
    _rule(f"{APOS}(?i:t)", trail="(?i:is|was)"),
    _rule(WORD, word, f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"),
    _rule("[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", word, f"(?i:n){APOSETC}(?i:t)"),
    _rule(WORD, word),
    _rule(
        f"{APOS}(?i:n){APOS}?|[lLdDjJ]{APOS}|(?i:dunkin|somethin|ol){APOS}|{APOS}(?i:em)"
        f"|[A-HJ-XZn]{APOSETC}{L}{{2}}{L}*|{APOS}[2-9]0(?i:s)|{APOS}(?i:till?|cause)"
        f"|{L}+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{L}*|(?i:cont'd\\.?|'twas|nor'easter|c'mon"
        f"|e'er|s'mores|ev'ry|li'l|nat'l)|(?i:o){APOSETC}(?i:o)",
    ),
    _rule(f"(?i:y){APOS}", trail=L),
    _rule(f"(?i:https?)://{_URLCHAR}+{_URLEND}"),
    _rule(
        '(?:www\\.(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}'
        "|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+(?i:com|net|org|edu))"
        f"(?:/{_URLCHAR}+{_URLEND})?"
    ),
    _rule(
        '(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{}]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\\.)*'
        '[^ \t\n\f\r"<>|(){}.\u00a0]+(?:&gt;|>)?'
    ),
    _rule(f"@[a-zA-Z_][a-zA-Z_0-9]*|#{L}+"),
    _rule(f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))", quotes, "(?:[^A-Za-z]|\\Z)"),
    _rule(f"(?i:n){APOSETC}(?i:t)", quotes, "(?:[^A-Za-z]|\\Z)"),
    _rule(f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}"),
    _rule(f"[-+]?(?:{D}*(?:[.:,\u00ad\u066b\u066c]{D}+)+|{D}+)", word),
    _rule(
        "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"
    ),
    _rule(f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", nbsp),
    _rule("[\u00bc\u00bd\u00be\u2153\u2154]", lambda t: ([_FRACTIONS[t]], 1)),
    _rule(
        "-(?:(?i:RRB|LRB|RCB|LCB|RSB|LSB))-|(?i:C\\.D\\.s|pro-|anti-|S&P-500|S&Ls)"
        f"|(?i:cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)"
    ),
    _rule(f"{APOS}[0-9][0-9]", trail=f"{SPACENL}|\\Z"),
    _rule("(?i:c#|f#|c\\+\\+)"),
    _rule("[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),
    _rule("[A-Z]*\\$|#"),
    _rule(
        "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
        lambda t: ([_CURRENCY.get(t, t)], 1),
    ),
    _rule(f"{ACRO}\\.", acronym_end, f"{SPACENL}+(?:{STARTERS}|{SGML}){SPACENL}"),
    _rule(f"{ABBREV1}\\.", reread_period, SENTEND),
    _rule(f"{ABBREV1}\\.", trail="[\\s\\S]{0,2}"),
    _rule(f"(?:{ABBREV2}|{ACRO})\\."),
    _rule(f"{ABBREV3}\\.", trail=f"{SPACENL}?{D}"),
    _rule(f"{WORD}\\.", word, "[,;:\u3001]"),
    _rule(f"{HTHING}\\.", word, "[,;:\u3001]"),
    _rule(f"{THING}\\.", word, "[,;:\u3001]"),
    _rule(f"{THINGA}\\.", ampersand, "[,;:\u3001]"),
    _rule(
        "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
        "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}"
        "\\.[0-9]{3,5}",
        lambda t: smiley(nbsp(t)[0][0]),
    ),
    _rule('"|(?i:&quot;)', const("``"), "[A-Za-z0-9$]"),
    _rule('"|(?i:&quot;)', const("''")),
    _rule("<<|>>"),
    _rule("<|(?i:&lt;)", const("<")),
    _rule(">|(?i:&gt;)", const(">")),
    _rule("[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", smiley, "[^A-Za-z0-9]|\\Z"),
    _rule(
        "[\\^x=~<>]\\.\\[\\^x=~<>]|[-\\^x=~<>']_[-\\^x=~<>']|\\([-\\^x=~<>'][_.]?[-\\^x=~<>']\\)"
        "|\\([\\^x=~<>']-[\\^x=~<>'`]\\)",
        smiley,
    ),
    _rule("[][(){}]", lambda t: ([_BRACKETS[t]], 1)),
    _rule("-+", hyphens),
    _rule("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", const("...")),
    _rule("@+|#+|_+|\\*+|(?:\\\\\\*){1,3}"),
    _rule("[,;:\u3001]|[?!]+|[.\u00bf\u00a1\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
    _rule("[=/]"),
    _rule(f"{_FILE}+(?:\\.{_FILE}+)*\\.{FILE_EXT}", trail=f"{SPACENL}|[.!?,]"),
    _rule(HTHING, word),
    _rule(THING, word),
    _rule(THINGA, ampersand),
    _rule("'", const("`"), "[A-Za-z][^ \t\n\r\u00a0]"),
    _rule(f"{APOS}(?:[msdMSD]|(?i:re|ve|ll))", quotes),
    _rule(
        "''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039"
        f"\u203a\u00ab\u00bb]{{1,2}}|{APOS}",
        quotes,
    ),
    _rule(f"[+%&~^|\\\\{MISC}]"),
    _rule(f"{SPACE}+|[\u0000\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)", lambda t: ([], len(t))),
    # Only "\n" separates captions; other line breaks (pycocoevalcap would misalign on them)
    # separate tokens.
    _rule(NEWLINE, lambda t: (["\n"] if t.endswith("\n") else [], len(t))),
]
