import sys

from smtp_gate.cli import main

sys.exit(main())
