r"""Import PyTorch weights into a stagejax model directory: python -m stagejax.convert

    python -m stagejax.convert --from FILE --arch NAME --out DIR [--num_classes 12] \
        [--new_head] [--trust_pickle]

writes DIR (new or empty; it appears only once complete), which
``--config.init_from=DIR`` trains, evaluates or predicts from. A file whose final
classifier has another class count (e.g. torchvision's 1000 ImageNet classes) needs
``--new_head``; a whole pickled module (``torch.save(model)``) needs
``--trust_pickle``, since unpickling can run code. Bad input is one ``error:``
line naming the file, exit status 2.
"""

from absl import flags

from stagejax import cli, models
from stagejax.convert import convert_file
from stagejax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "torch checkpoint file")
flags.DEFINE_enum("arch", None, models.NAMES, "architecture of the weights")
flags.DEFINE_string("out", None, "output model directory (new or empty)")
flags.DEFINE_integer(
    "num_classes",
    12,
    "classes of the output model (default: the 12 stages); a file whose final "
    "classifier has another count is refused unless --new_head is given",
    lower_bound=1,
)
flags.DEFINE_boolean(
    "new_head",
    False,
    "replace the final classifier layer by a freshly initialised one with "
    "--num_classes outputs, e.g. to fine-tune from torchvision's ImageNet weights",
)
flags.DEFINE_boolean(
    "trust_pickle",
    False,
    "allow whole pickled modules (torch.save(model)); unpickling can run code",
)

USAGE = (
    "python -m stagejax.convert --from FILE --arch NAME --out DIR [--num_classes 12] "
    "[--new_head] [--trust_pickle]"
)


def convert_command() -> None:
    """The one command: convert ``--from`` into the model directory ``--out``."""
    missing = [f"--{name}" for name in ("from", "arch", "out") if FLAGS[name].value is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required; usage: {USAGE}")
    out = convert_file(
        FLAGS["from"].value,
        FLAGS.arch,
        FLAGS.out,
        num_classes=FLAGS.num_classes,
        trust_pickle=FLAGS.trust_pickle,
        new_head=FLAGS.new_head,
    )
    print(f"wrote {out} ({FLAGS.arch}, {FLAGS.num_classes} classes)")


def main() -> None:
    cli.run_commands(
        {"convert": convert_command},
        interrupted="interrupted: no model directory was written",
        default="convert",
    )


if __name__ == "__main__":
    main()
