import sys

from vmlease.cli import main

sys.exit(main())
