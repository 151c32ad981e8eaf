"""Figures for papers (matplotlib): one function per figure, taking analysis results."""

from .figures import FIGURES, overview
from .style import WIDTHS, paper_style, save

__all__ = ["FIGURES", "WIDTHS", "overview", "paper_style", "save"]
