"""Reading a shared library's ELF dynamic section without loading it (pyelftools)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from opserve.errors import InvalidArgumentError


@dataclass(frozen=True)
class ElfFacts:
    needed: tuple[str, ...]  # DT_NEEDED sonames
    defined: frozenset[str]  # dynamic symbols the library defines
    undefined: frozenset[str]  # dynamic symbols it needs from elsewhere (weak ones left out)
    runpath: tuple[str, ...]  # DT_RUNPATH, or else DT_RPATH, entries ($ORIGIN unexpanded)


@lru_cache(maxsize=256)
def _read(path: Path, mtime_ns: int, size: int) -> ElfFacts:
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    defined: set[str] = set()
    undefined: set[str] = set()
    try:
        with path.open("rb") as stream:
            elf = ELFFile(stream)
            for section in elf.iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags():
                        if tag.entry.d_tag == "DT_NEEDED":
                            needed.append(tag.needed)
                        elif tag.entry.d_tag == "DT_RUNPATH":
                            runpath += tag.runpath.split(":")
                        elif tag.entry.d_tag == "DT_RPATH":
                            rpath += tag.rpath.split(":")
                elif isinstance(section, SymbolTableSection) and section.name == ".dynsym":
                    for symbol in section.iter_symbols():
                        if not symbol.name:
                            continue
                        if symbol["st_shndx"] == "SHN_UNDEF":
                            if symbol["st_info"]["bind"] != "STB_WEAK":
                                undefined.add(symbol.name)
                        else:
                            defined.add(symbol.name)
    except (ELFError, OSError, ValueError) as exc:
        raise InvalidArgumentError(f"not a readable ELF shared library ({exc})") from exc
    return ElfFacts(
        tuple(needed), frozenset(defined), frozenset(undefined), tuple(runpath or rpath)
    )


def read_elf(path: Path) -> ElfFacts:
    """The dynamic facts of a library (cached while the file is unchanged)."""
    stat = path.stat()
    return _read(path.resolve(), stat.st_mtime_ns, stat.st_size)
