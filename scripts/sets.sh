# Sourced by setup.sh, test.sh and bench.sh: which pinned set of versions to use.
#   --set NAME   requirements/NAME.txt (default: default); the other arguments go to REST.
# Sets SET, LOCK (the lock file), VENV and VENV_ABS (its virtual environment) and SRC (the
# tree it runs in).  Run from the repository root.
SET=default
REST=()
while [ $# -gt 0 ]; do
    case "$1" in
        --set) SET=${2:?--set needs a name}; shift 2 ;;
        --set=*) SET=${1#--set=}; shift ;;
        *) REST+=("$1"); shift ;;
    esac
done
LOCK=requirements/$SET.txt
if [ ! -f "$LOCK" ]; then
    echo "no pinned set '$SET': choose one of: $(cd requirements && ls *.txt | sed 's/\.txt$//' | tr '\n' ' ')" >&2
    exit 2
fi
if [ "$SET" = default ]; then
    VENV=.venv
    SRC=.
else
    VENV=.venv-$SET
    SRC=$VENV/src
fi
VENV_ABS=$(pwd)/$VENV
