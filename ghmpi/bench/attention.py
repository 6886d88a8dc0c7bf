"""Placeholder until the suite lands: it reports that it is not written yet."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> dict:
    raise SystemExit("ghmpi bench attention: not written yet")
