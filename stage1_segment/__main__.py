"""``python -m stage1_segment fit|validate|predict -c configs/stage1/<profile>.yaml ...``."""

from stage1_segment.cli import main

if __name__ == "__main__":
    main()
