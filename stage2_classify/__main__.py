"""``python -m stage2_classify fit|validate|predict -c configs/stage2/<exp>.yaml``."""

from stage2_classify.cli import cli_main

if __name__ == "__main__":
    cli_main()
