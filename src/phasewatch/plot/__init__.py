"""Figures for papers (matplotlib): one function per figure, taking analysis results."""

from .figures import FIGURES, noise, overview
from .style import WIDTHS, paper_style, save

__all__ = ["FIGURES", "WIDTHS", "noise", "overview", "paper_style", "save"]
