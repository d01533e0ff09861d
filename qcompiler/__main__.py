import sys

from qcompiler.cli import main

sys.exit(main())
