"""A minimal .xlsx writer (one sheet, strings and numbers), for submission files such as MMBench's
results.xlsx, without a spreadsheet dependency.  Readable by openpyxl/pandas and spreadsheet apps."""

from __future__ import annotations

import pathlib
import re
import zipfile
from typing import Any, Sequence
from xml.sax.saxutils import escape

_CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">
<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>
<Default Extension="xml" ContentType="application/xml"/>
<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>
<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>
</Types>"""
_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">
<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/>
</Relationships>"""
_WORKBOOK = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">
<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets>
</workbook>"""
_WORKBOOK_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">
<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/>
</Relationships>"""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # not allowed in XML


def _column(n: int) -> str:
  name = ""
  n += 1
  while n:
    n, r = divmod(n - 1, 26)
    name = chr(65 + r) + name
  return name


def _cell(ref: str, value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f'<c r="{ref}"><v>{value}</v></c>'
  text = escape(_CONTROL.sub("", str(value)))
  return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def sheet_xml(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = []
  for r, row in enumerate([list(header)] + [list(x) for x in rows], 1):
    cells = "".join(_cell(f"{_column(c)}{r}", v) for c, v in enumerate(row))
    lines.append(f'<row r="{r}">{cells}</row>')
  return ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
          '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
          + "".join(lines) + "</sheetData></worksheet>")


def write_xlsx(path: str | pathlib.Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Writes one sheet (a header row, then `rows`; None leaves a cell empty)."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("[Content_Types].xml", _CONTENT_TYPES)
    z.writestr("_rels/.rels", _RELS)
    z.writestr("xl/workbook.xml", _WORKBOOK)
    z.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
    z.writestr("xl/worksheets/sheet1.xml", sheet_xml(header, rows))


def read_xlsx(path: str | pathlib.Path) -> list[list[str]]:
  """The rows of the first sheet as strings (inline strings and numbers; for tests and checks)."""
  with zipfile.ZipFile(path) as z:
    xml = z.read("xl/worksheets/sheet1.xml").decode()
  rows = []
  for row in re.findall(r"<row [^>]*>(.*?)</row>", xml, re.S):
    cells = {}
    for ref, body in re.findall(r'<c r="([A-Z]+)\d+"[^>]*>(.*?)</c>', row, re.S):
      m = re.search(r"<t[^>]*>(.*?)</t>|<v>(.*?)</v>", body, re.S)
      cells[ref] = _unescape((m.group(1) if m.group(1) is not None else m.group(2)) if m else "")
    width = max((_index(c) for c in cells), default=-1) + 1
    rows.append([cells.get(_column(i)) for i in range(width)])
  return rows


def _index(col: str) -> int:
  n = 0
  for ch in col:
    n = n * 26 + ord(ch) - 64
  return n - 1


def _unescape(text: str) -> str:
  from xml.sax.saxutils import unescape
  return unescape(text)


__all__ = ["write_xlsx", "read_xlsx", "sheet_xml"]
