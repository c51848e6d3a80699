# Shared by the test and benchmark scripts: make sure the database servers the tests talk to
# are installed, running, and have the test role. Idempotent; needs root for the first run.

PJQ_TEST_PASSWORD=pjq_test

say() { printf '== %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian's promtool, for the metrics tests: extracted from the `prometheus` package into
# target/tools rather than installed, which would start a Prometheus server. Exports
# PJQ_PROMTOOL.
fetch_promtool() {
  local tools=target/tools
  if [ ! -x "$tools/usr/bin/promtool" ]; then
    say "fetching promtool from Debian's prometheus package"
    mkdir -p "$tools"
    (cd "$tools" && { apt-get download prometheus >/dev/null 2>&1 \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    dpkg-deb -x "$tools"/prometheus_*.deb "$tools"
    rm -f "$tools"/prometheus_*.deb
  fi
  PJQ_PROMTOOL=$(realpath "$tools/usr/bin/promtool")
  export PJQ_PROMTOOL
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 60); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  say "$what did not come up"
  return 1
}

start_postgres() {
  apt_install postgresql postgresql-client
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
  fi
}

start_mariadb() {
  apt_install mariadb-server mariadb-client
  if ! mariadb-admin --protocol=socket -u root ping >/dev/null 2>&1 \
      && ! mariadb-admin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    say "starting MariaDB"
    as_root install -d -o mysql -g mysql /run/mysqld
    as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    wait_for MariaDB sh -c 'mariadb-admin --protocol=socket -u root ping || mariadb-admin -h 127.0.0.1 -u root ping'
  fi
}

# Runs SQL as PostgreSQL's superuser: over the local socket as the postgres OS user (peer
# authentication, Debian's default), else over TCP as the postgres role.
postgres_admin() {
  if as_root runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres "$@" 2>/dev/null; then
    return 0
  fi
  psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d postgres "$@"
}

# Runs SQL as MariaDB's root: over the socket (unix_socket authentication, Debian's
# default), else over TCP.
mariadb_admin() {
  if as_root mariadb --protocol=socket -u root "$@" 2>/dev/null; then
    return 0
  fi
  mariadb -h 127.0.0.1 -u root "$@"
}

provision_test_roles() {
  say "creating the pjq_test role on PostgreSQL and MariaDB"
  postgres_admin <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pjq_test') THEN
    CREATE ROLE pjq_test LOGIN CREATEDB PASSWORD '$PJQ_TEST_PASSWORD';
  ELSE
    ALTER ROLE pjq_test LOGIN CREATEDB PASSWORD '$PJQ_TEST_PASSWORD';
  END IF;
  -- The secrets test gives this role random passwords (a role may change its own).
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pjq_secret') THEN
    CREATE ROLE pjq_secret LOGIN PASSWORD '$PJQ_TEST_PASSWORD';
  ELSE
    ALTER ROLE pjq_secret LOGIN PASSWORD '$PJQ_TEST_PASSWORD';
  END IF;
END \$\$;
SQL
  mariadb_admin <<SQL
CREATE USER IF NOT EXISTS 'pjq_test'@'127.0.0.1' IDENTIFIED BY '$PJQ_TEST_PASSWORD';
CREATE USER IF NOT EXISTS 'pjq_test'@'localhost' IDENTIFIED BY '$PJQ_TEST_PASSWORD';
GRANT ALL PRIVILEGES ON \`pjq\\_%\`.* TO 'pjq_test'@'127.0.0.1';
GRANT ALL PRIVILEGES ON \`pjq\\_%\`.* TO 'pjq_test'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# Drops databases left behind by test runs that were killed.
drop_stale_test_databases() {
  local name
  for name in $(postgres_admin -At -c "SELECT datname FROM pg_database WHERE datname LIKE 'pjq\\_t%' OR datname LIKE 'pjq\\_bench%'"); do
    postgres_admin -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" || true
  done
  for name in $(mariadb_admin -N -e "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'pjq\\_t%' OR schema_name LIKE 'pjq\\_bench%'"); do
    mariadb_admin -e "DROP DATABASE IF EXISTS \`$name\`" || true
  done
}

start_database_servers() {
  start_postgres
  start_mariadb
  provision_test_roles
  drop_stale_test_databases
  export PJQ_TEST_POSTGRES_URL="postgres://pjq_test:$PJQ_TEST_PASSWORD@127.0.0.1:5432"
  export PJQ_TEST_MARIADB_URL="mysql://pjq_test:$PJQ_TEST_PASSWORD@127.0.0.1:3306"
}
