# Shared by bench/l7/run.sh and bench/l7/http.sh (sourced, not run): the work directory and
# the cleanup of what the script started, the nginx backend and reverse proxy, waiting for
# ports, and one wrk measurement with the server's CPU time per request.
# The sourcing script sets BACKEND, NGINX_RP and URLPATH (BACKEND_H2 for an h2c backend too).

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts nginx as the backend (1 worker returning 200 "ok"; h2c on BACKEND_H2 when set) and as
# a plain reverse proxy to it on NGINX_RP; sets be_pid and rp_pid.
start_nginx() {
    local h2=""
    [ -z "${BACKEND_H2:-}" ] || h2="server { listen $BACKEND_H2 http2; location / { return 200 \"ok\\n\"; } }"
    mkdir -p "$work/backend" "$work/rp"
    cat > "$work/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend/nginx.pid;
error_log $work/backend/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/backend;
    server { listen $BACKEND; location / { return 200 "ok\n"; } }
    $h2
}
CONF
    cat > "$work/rp/nginx.conf" <<CONF
worker_processes auto;
daemon off;
pid $work/rp/nginx.pid;
error_log $work/rp/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/rp;
    proxy_temp_path $work/rp;
    upstream be { server $BACKEND; keepalive 128; keepalive_requests 1000000; }
    server {
        listen $NGINX_RP;
        location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF
    nginx -p "$work/backend" -c "$work/backend/nginx.conf" & be_pid=$!; pids+=($be_pid)
    nginx -p "$work/rp" -c "$work/rp/nginx.conf" & rp_pid=$!; pids+=($rp_pid)
}

wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    exit 1
}

tck=$(getconf CLK_TCK)
cpu_ticks() { # pid -> "utime stime" of the process and its child processes (nginx workers)
    local u=0 k=0 p pu pk
    for p in $1 $(pgrep -P "$1" || true); do
        read -r pu pk < <(awk '{print $14, $15}' "/proc/$p/stat")
        u=$((u + pu)); k=$((k + pk))
    done
    echo "$u $k"
}
ctx_switches() { # pid -> voluntary + involuntary context switches of all its threads and children
    local total=0 p t
    for p in $1 $(pgrep -P "$1" || true); do
        for t in /proc/"$p"/task/*; do
            total=$((total + $(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")))
        done
    done
    echo "$total"
}
# target pid [connections] -> "rps p99_ms cpu_us_per_request user_us sys_us ctx_switches_per_request"
# (CPU and context switches: the pid's and its children's, over the requests wrk completed)
wrk_run() {
    local before after cs0 cs1 u0 k0 u1 k1
    before=$(cpu_ticks "$2"); cs0=$(ctx_switches "$2")
    wrk -t1 -c"${3:-32}" -d"${DUR}s" --latency "http://$1$URLPATH" >"$work/wrk.out"
    after=$(cpu_ticks "$2"); cs1=$(ctx_switches "$2")
    read -r u0 k0 <<<"$before"; read -r u1 k1 <<<"$after"
    awk -v ut=$((u1 - u0)) -v kt=$((k1 - k0)) -v cs=$((cs1 - cs0)) -v tck="$tck" '
        /^Requests\/sec:/ {rps=$2}
        /requests in/ {n=$1}
        $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; p99=v}
        /Non-2xx/ {bad=$NF}
        END {
            if (bad) {print "non-2xx answers: " bad > "/dev/stderr"; exit 1}
            if (!n) n = 1
            printf "%s %s %.2f %.2f %.2f %.3f\n", rps, p99, (ut+kt)/tck*1e6/n, ut/tck*1e6/n, kt/tck*1e6/n, cs/n
        }' "$work/wrk.out"
}
