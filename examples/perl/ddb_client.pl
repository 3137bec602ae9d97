#!/usr/bin/perl
# ddb_client.pl - call one DynamoDB operation with AWS Signature Version 4, using core Perl modules only.
#
#   perl ddb_client.pl --endpoint http://127.0.0.1:8000 --region us-east-1 GetItem \
#       '{"TableName":"orders","Key":{"pk":{"S":"42"}}}'
#
# Prints the response body (JSON) on stdout and exits 0 on HTTP 200; prints the status and the error body
# on stderr and exits 1 otherwise; exits 2 on a usage error. Credentials come from AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY and the optional AWS_SESSION_TOKEN, as in any AWS SDK.
use v5.36;

use Digest::SHA qw(sha256_hex hmac_sha256 hmac_sha256_hex);
use Getopt::Long qw(GetOptionsFromArray);
use HTTP::Tiny;
use JSON::PP;
use POSIX qw(strftime);
use Time::HiRes ();

use constant {
    SERVICE       => 'dynamodb',
    TARGET_PREFIX => 'DynamoDB_20120810',
    CONTENT_TYPE  => 'application/x-amz-json-1.0',
    BACKOFF_BASE  => 0.05,    # seconds; the n-th retry waits a random time up to BASE * 2**n ...
    BACKOFF_CAP   => 5,       # ... but never more than this ("full jitter")
};

# Errors that mean "slow down, then try again" (HTTP 400 with one of these __type names).
my %THROTTLING = map { $_ => 1 } qw(
  ProvisionedThroughputExceededException ThrottlingException RequestLimitExceeded
);

sub usage ($message = undef) {
    print STDERR "ddb_client: $message\n" if defined $message;
    print STDERR <<~'USAGE';
      usage: ddb_client.pl --endpoint URL [--region REGION] [--retries N] [--timeout SECONDS]
                           OPERATION ['JSON-BODY' | -]
        --endpoint  e.g. http://127.0.0.1:8000 (default: $AWS_ENDPOINT_URL_DYNAMODB or $AWS_ENDPOINT_URL)
        --region    region to sign for (default: $AWS_REGION or $AWS_DEFAULT_REGION)
        --retries   retries on 5xx, throttling and connection errors, with exponential backoff (default 3)
        --timeout   per-attempt timeout in seconds (default 10)
        JSON-BODY   the request as JSON (default {}); "-" reads it from stdin
      USAGE
    exit 2;
}

# Split http(s)://host[:port][/path] into what the signature needs. The Host value must be exactly the
# one HTTP::Tiny sends: the port is included unless it is the scheme's default.
sub parse_endpoint ($url) {
    my ($scheme, $host, $port, $path) = $url =~ m{^(https?)://([^/:?#]+)(?::(\d+))?(/[^?#]*)?$}i
      or return;
    $scheme = lc $scheme;
    $host   = lc $host;
    my $default_port = $scheme eq 'https' ? 443 : 80;
    $port //= $default_port;
    return {
        url  => $url,
        host => $port == $default_port ? $host : "$host:$port",
        path => (defined $path && length $path) ? $path : '/',
    };
}

# The SigV4 signing key: four chained HMACs over date, region, service and "aws4_request".
sub signing_key ($secret, $date, $region, $service) {
    my $key = hmac_sha256($date, "AWS4$secret");    # Digest::SHA takes (data, key)
    $key = hmac_sha256($region,  $key);
    $key = hmac_sha256($service, $key);
    return hmac_sha256('aws4_request', $key);
}

# Sign a request: returns the headers to add (authorization, x-amz-date, x-amz-security-token).
# %$headers holds the other headers to sign (lower-case names), including host.
sub sign_v4 (%req) {
    my ($creds, $region, $service, $headers) = @req{qw(credentials region service headers)};
    my $amz_date = strftime('%Y%m%dT%H%M%SZ', gmtime($req{time} // time));
    my $date     = substr($amz_date, 0, 8);

    my %added = ('x-amz-date' => $amz_date);
    $added{'x-amz-security-token'} = $creds->{session_token} if defined $creds->{session_token};
    my %signed = (%$headers, %added);

    # 1. Canonical request: method, path, query, headers (sorted, trimmed), signed header names, body hash.
    my @names             = sort keys %signed;
    my $canonical_headers = join '', map { "$_:" . trim_value($signed{$_}) . "\n" } @names;
    my $signed_headers    = join ';', @names;
    my $canonical_request = join "\n",
      $req{method}, $req{path}, '', $canonical_headers, $signed_headers, sha256_hex($req{body});

    # 2. String to sign: algorithm, time, credential scope, hash of the canonical request.
    my $scope          = "$date/$region/$service/aws4_request";
    my $string_to_sign = join "\n", 'AWS4-HMAC-SHA256', $amz_date, $scope, sha256_hex($canonical_request);

    # 3. Signature with the derived key.
    my $signature = hmac_sha256_hex($string_to_sign,
        signing_key($creds->{secret_access_key}, $date, $region, $service));

    $added{authorization} = "AWS4-HMAC-SHA256 Credential=$creds->{access_key_id}/$scope, "
      . "SignedHeaders=$signed_headers, Signature=$signature";
    return \%added;
}

sub trim_value ($value) {
    $value =~ s/^\s+|\s+$//g;
    $value =~ s/\s+/ /g;
    return $value;
}

sub error_type ($body) {
    my $error = eval { JSON::PP->new->decode($body) };
    return '' unless ref $error eq 'HASH' && defined $error->{__type};
    return $error->{__type} =~ s/.*#//r;    # "com.amazonaws.dynamodb.v20120810#X" -> "X"
}

sub retryable ($response) {
    my $status = $response->{status};
    return 1 if $status >= 500;    # includes HTTP::Tiny's 599: connection refused, reset, timeout
    return $status == 400 && $THROTTLING{ error_type($response->{content} // '') };
}

# Call one operation; sign every attempt afresh (the date moves on). Returns HTTP::Tiny's response hash.
sub call_dynamodb (%args) {
    my ($http, $endpoint, $operation, $body, $retries) = @args{qw(http endpoint operation body retries)};
    my $attempt = 0;
    while (1) {
        my %headers = (
            'content-type' => CONTENT_TYPE,
            'x-amz-target' => TARGET_PREFIX . ".$operation",
        );
        my $auth = sign_v4(
            method      => 'POST',
            path        => $endpoint->{path},
            headers     => { %headers, host => $endpoint->{host} },
            body        => $body,
            region      => $args{region},
            service     => SERVICE,
            credentials => $args{credentials},
        );
        # HTTP::Tiny adds the Host header itself (and refuses one from us); it matches what we signed.
        my $response = $http->request('POST', $endpoint->{url},
            { headers => { %headers, %$auth }, content => $body });

        return $response if $response->{success} || $attempt >= $retries || !retryable($response);

        my $ceiling = BACKOFF_BASE * 2**$attempt;
        my $delay   = rand($ceiling < BACKOFF_CAP ? $ceiling : BACKOFF_CAP);
        $attempt++;
        my $reason = error_type($response->{content} // '') || $response->{reason};
        $reason = ($response->{content} // '') =~ s/\s+$//r if $response->{status} == 599;
        printf STDERR "ddb_client: attempt %d: HTTP %d %s; retrying in %.3fs\n",
          $attempt, $response->{status}, $reason, $delay;
        Time::HiRes::sleep($delay);
    }
}

sub main (@argv) {
    my %opt = (
        endpoint => $ENV{AWS_ENDPOINT_URL_DYNAMODB} // $ENV{AWS_ENDPOINT_URL},
        region   => $ENV{AWS_REGION} // $ENV{AWS_DEFAULT_REGION},
        retries  => 3,
        timeout  => 10,
    );
    GetOptionsFromArray(\@argv, \%opt, 'endpoint=s', 'region=s', 'retries=i', 'timeout=f', 'help|h')
      or usage();
    usage() if $opt{help};
    my ($operation, $body) = @argv;
    usage('missing OPERATION')                       unless defined $operation;
    usage("bad OPERATION '$operation'")              unless $operation =~ /^[A-Za-z]+$/;
    usage('too many arguments')                      if @argv > 2;
    usage('missing --endpoint')                      unless defined $opt{endpoint};
    usage('missing --region (or AWS_REGION)')        unless defined $opt{region};
    usage('--retries must be >= 0')                  if $opt{retries} < 0;

    my $endpoint = parse_endpoint($opt{endpoint}) or usage("bad --endpoint '$opt{endpoint}'");
    my %credentials = (
        access_key_id     => $ENV{AWS_ACCESS_KEY_ID},
        secret_access_key => $ENV{AWS_SECRET_ACCESS_KEY},
        session_token     => $ENV{AWS_SESSION_TOKEN} || undef,
    );
    usage('AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set')
      unless $credentials{access_key_id} && $credentials{secret_access_key};

    $body //= '{}';
    $body = do { local $/; <STDIN> } if $body eq '-';
    # Command-line arguments are bytes already; send them as they are, after checking they are JSON.
    eval { JSON::PP->new->utf8->decode($body); 1 } or usage("JSON-BODY is not valid JSON: $@");

    my $http = HTTP::Tiny->new(
        timeout    => $opt{timeout},
        agent      => 'ddb-sidecar-perl-example/1.0 ',
        verify_SSL => 1,
    );
    my $response = call_dynamodb(
        http        => $http,
        endpoint    => $endpoint,
        region      => $opt{region},
        credentials => \%credentials,
        operation   => $operation,
        body        => $body,
        retries     => $opt{retries},
    );

    my $content = $response->{content} // '';
    if ($response->{status} == 200) {
        print $content, "\n";
        return 0;
    }
    my $type = error_type($content);
    print STDERR "ddb_client: $operation failed: HTTP $response->{status} $response->{reason}"
      . ($type ? " ($type)" : '') . "\n";
    print STDERR $content, ($content =~ /\n\z/ ? '' : "\n");
    return 1;
}

exit main(@ARGV);
