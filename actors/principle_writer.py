"""The principle writer as a Ray actor: one per run, a thin shell over `sami.principle_writer.PrincipleWriterCore`."""
import ray

from sami.principle_writer import PrincipleWriterCore

PrincipleWriterActor = ray.remote(PrincipleWriterCore)
