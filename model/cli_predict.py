"""`python -m openvla_model.cli_predict` == `openvla-predict` (for environments without the script)."""
import sys

from .cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
