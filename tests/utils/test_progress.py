"""Progress in a log file: lines of their own, so that the result printed next starts a line."""
import io

from tcae_ldm.utils.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_lines_and_a_terminal_a_bar():
    log = io.StringIO()
    assert list(progress(range(5), "features", total=5, file=log)) == [0, 1, 2, 3, 4]
    log.write("gfid = 1.0\n")  # a command's result, as `tcae-ldm fid 2>&1 | tee log` interleaves them
    text = log.getvalue()
    assert text == "features: 5 batches in 0:00\ngfid = 1.0\n"  # the end line; lines every 30 s before it
    tty = Terminal()
    assert list(progress(range(3), "features", total=3, file=tty)) == [0, 1, 2]
    assert "\r" in tty.getvalue()  # tqdm's bar, redrawn in place
    assert list(progress(range(2), None, file=log)) == [0, 1] and log.getvalue() == text  # no desc: silent


def test_a_commands_progress_never_shares_the_result_line(tmp_path, capsys):
    from tcae_ldm.commands.fid_stats import main

    main(["--demo", "--split", "val", "--features", "random", "--out", str(tmp_path / "s.npz"), "--max-images", "8",
          "--batch-size", "4"])
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "random features: 2 batches in" in captured.err
    assert captured.out.startswith("wrote ")
