import sys

from toy.world import main

sys.exit(main())
