import sys

from dms_perf.ci.runner import main

sys.exit(main())
